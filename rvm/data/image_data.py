"""`ImageData`, the in-memory image-classification dataset that every image source builds."""

from __future__ import annotations

import dataclasses

import numpy as np

from rvm.errors import DataError


@dataclasses.dataclass(frozen=True)
class ImageData:
    """An image-classification dataset held in host memory: uint8 NHWC images, int32 labels.

    `val_*` is a validation split held out from the original training split (or None).
    """

    name: str
    num_classes: int
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    def __post_init__(self):
        # Catch a malformed source here rather than as a shape error inside jit.
        for split in ("train", "test", "val"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images is None and labels is None and split == "val":
                continue
            if images is None or labels is None:
                raise DataError(f"{self.name}: {split} split has images or labels but not both")
            if images.dtype != np.uint8 or images.ndim != 4:
                raise DataError(
                    f"{self.name}: {split}_images must be uint8 NHWC, got "
                    f"{images.dtype} with shape {images.shape}"
                )
            if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
                raise DataError(
                    f"{self.name}: {split}_labels must be int32 of shape {images.shape[:1]}, "
                    f"got {labels.dtype} {labels.shape}"
                )
