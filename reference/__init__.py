"""PyTorch reference implementations that ``numpylenet`` is checked against (needs torch)."""

from reference.lenet import LeNet, TorchLeNet5, copy_numpy_to_torch, copy_torch_to_numpy

__all__ = ["LeNet", "TorchLeNet5", "copy_numpy_to_torch", "copy_torch_to_numpy"]
