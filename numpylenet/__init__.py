"""numpylenet: LeNet-5 from scratch in NumPy, checked against PyTorch.

The public API: the layers (:mod:`numpylenet.layers`), the loss (:mod:`numpylenet.loss`), the
model (:mod:`numpylenet.model`) and the optimisers (:mod:`numpylenet.optim`).
"""
from .layers import (AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, Parameter, ReLU, Sigmoid, Tanh,
                     col2im, im2col)
from .loss import softmax_cross_entropy
from .model import LeNet5
from .optim import SGD, Adam

__version__ = "0.1.0"

__all__ = [
    "Parameter", "Conv2d", "AvgPool2d", "MaxPool2d", "ReLU", "Tanh", "Sigmoid", "Flatten", "Linear",
    "im2col", "col2im", "softmax_cross_entropy", "LeNet5", "Adam", "SGD",
]
