"""adafocus: deploy Uni-AdaFocus adaptive video recognition models on edge devices and GPUs."""

__version__ = "0.1.0"
