"""Datasets (CIFAR-10, synthetic) in host memory and the on-device input pipeline."""

from rvm.data.cifar10 import (
    DataNotFoundError,
    hold_out,
    load_binary,
    load_images,
    load_tfds,
    write_binary,
)
from rvm.data.image_data import ImageData
from rvm.data.pipeline import (
    augment,
    batch_indices,
    eval_batches,
    normalization_stats,
    normalize,
)
from rvm.data.synthetic import make_synthetic

__all__ = [
    "DataNotFoundError",
    "ImageData",
    "augment",
    "batch_indices",
    "eval_batches",
    "hold_out",
    "load_binary",
    "load_images",
    "load_tfds",
    "make_synthetic",
    "normalization_stats",
    "normalize",
    "write_binary",
]
