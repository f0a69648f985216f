"""Data shipped with numpylenet: ``MNIST-sample/raw/``, the first 6,000 training and 1,000 test
images of MNIST (see ``MNIST-sample/README.md``), made by :mod:`numpylenet.datasets.make_sample`."""
