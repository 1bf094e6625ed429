"""piip: Parameter-Inverted Image Pyramid Networks with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
