"""CIFAR-10 from tensorflow-datasets or the official binary archive, and `load_images`.

Two readers because neither is always available: tfds is how most users get CIFAR-10,
but preparing it needs TensorFlow and a download, while the official "binary version"
archive is a flat byte layout numpy reads directly (and, unlike the python version,
needs no unpickling, which would execute whatever the file contains).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rvm.data.image_data import ImageData
from rvm.data.synthetic import make_synthetic
from rvm.errors import ConfigError, DataError, UserError

LAYOUT_DIR = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
RECORDS_PER_FILE = 10000
IMAGE_SHAPE = (32, 32, 3)
RECORD_BYTES = 1 + 32 * 32 * 3  # one label byte, then the R, G and B planes
NUM_CLASSES = 10
SOURCES = ("tfds", "binary", "synthetic", "auto")
BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


class DataNotFoundError(UserError, FileNotFoundError):
    """The requested data source holds no usable CIFAR-10 (the message says where it looked)."""


def load_images(config: Mapping[str, Any]) -> ImageData:
    """Loads the dataset that the `data` section of a training config asks for.

    Reads `source`, `binary_dir`, `tfds_data_dir`, `holdout`, `holdout_seed`, and for the
    synthetic source `synthetic_train`, `synthetic_test`, `seed`.
    """
    source = config.get("source", "auto")
    if source == "synthetic":
        data = make_synthetic(
            int(config.get("synthetic_train", 2048)),
            int(config.get("synthetic_test", 512)),
            int(config.get("seed", 0)),
        )
    elif source == "tfds":
        data = load_tfds(config.get("tfds_data_dir"))
    elif source == "binary":
        data = load_binary(_required_dir(config))
    elif source == "auto":
        data = _load_auto(config.get("tfds_data_dir"), config.get("binary_dir"))
    else:
        raise ConfigError(f"data.source={source!r} is not one of {', '.join(SOURCES)}")
    return hold_out(data, config.get("holdout", 0), config.get("holdout_seed", 0))


def hold_out(data: ImageData, holdout: int, seed: int) -> ImageData:
    """Moves `holdout` training images, chosen by `seed` alone, into the validation split."""
    if isinstance(holdout, bool) or not isinstance(holdout, (int, np.integer)):
        raise ConfigError(f"data.holdout={holdout!r} must be a non-negative integer")
    n = len(data.train_labels)
    if not 0 <= holdout < n:
        raise ConfigError(f"data.holdout={holdout} must be in [0, {n}) for {n} training images")
    if holdout == 0:
        return data
    perm = np.random.default_rng(seed).permutation(n)
    # Sorted so both splits keep the source order; batches are shuffled later anyway.
    val, train = np.sort(perm[:holdout]), np.sort(perm[holdout:])
    return dataclasses.replace(
        data,
        train_images=data.train_images[train],
        train_labels=data.train_labels[train],
        val_images=data.train_images[val],
        val_labels=data.train_labels[val],
    )


# --- Official binary archive ---------------------------------------------------------------


def find_binary_layout(directory: str | Path) -> Path | None:
    """`directory/cifar-10-batches-bin`, or `directory` itself if it is that folder."""
    directory = Path(directory).expanduser().resolve()
    if directory.name == LAYOUT_DIR and directory.is_dir():
        return directory
    if (directory / LAYOUT_DIR).is_dir():
        return directory / LAYOUT_DIR
    return None


def load_binary(directory: str | Path) -> ImageData:
    """Reads the official layout (50000 train and 10000 test images) below `directory`."""
    return _load_binary(directory, RECORDS_PER_FILE)


def _load_binary(directory: str | Path, records_per_file: int) -> ImageData:
    layout = find_binary_layout(directory)
    if layout is None:
        raise DataNotFoundError(_layout_problem(Path(directory).expanduser().resolve()))
    train = [_read_batch_file(layout / name, records_per_file) for name in TRAIN_FILES]
    test_images, test_labels = _read_batch_file(layout / TEST_FILE, records_per_file)
    return ImageData(
        name="cifar10",
        num_classes=NUM_CLASSES,
        train_images=np.concatenate([x for x, _ in train]),
        train_labels=np.concatenate([y for _, y in train]),
        test_images=test_images,
        test_labels=test_labels,
    )


def _read_batch_file(path: Path, records_per_file: int) -> tuple[np.ndarray, np.ndarray]:
    """One `*.bin` file as (uint8 NHWC images, int32 labels), checked before it is trusted."""
    if not path.is_file():
        raise DataNotFoundError(f"{path}: missing (expected {_expected_size(records_per_file)})")
    size = path.stat().st_size
    if size != records_per_file * RECORD_BYTES:
        whole = "" if size % RECORD_BYTES else f" = {size // RECORD_BYTES} records"
        raise DataError(f"{path}: {size} bytes{whole}, expected {_expected_size(records_per_file)}")
    records = np.fromfile(path, dtype=np.uint8).reshape(records_per_file, RECORD_BYTES)
    labels = records[:, 0].astype(np.int32)
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise DataError(
            f"{path}: record {bad[0]} has label {labels[bad[0]]}, outside [0, {NUM_CLASSES - 1}] "
            f"({bad.size} such records); not a CIFAR-10 file"
        )
    # Each record stores whole colour planes (CHW); the models want HWC.
    planes = records[:, 1:].reshape(records_per_file, 3, 32, 32)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels


def _expected_size(records_per_file: int) -> str:
    return (
        f"{records_per_file * RECORD_BYTES} bytes "
        f"({records_per_file} records of {RECORD_BYTES} bytes)"
    )


def _layout_problem(directory: Path) -> str:
    """Why `directory` is not the binary layout, with the fix for the common mistakes."""
    if not directory.exists():
        what = "does not exist"
    elif (directory / TRAIN_FILES[0]).exists():
        what = f"holds {TRAIN_FILES[0]} directly; move the files into {directory / LAYOUT_DIR}/"
    elif (directory / "cifar-10-binary.tar.gz").exists():
        archive = directory / "cifar-10-binary.tar.gz"
        what = f"holds {archive.name} unextracted; run: tar xzf {archive} -C {directory}"
    elif (directory / "cifar-10-batches-py").exists():
        what = "holds the python (pickle) version, which is never unpickled; use the binary version"
    else:
        what = f"has no {LAYOUT_DIR}/ folder"
    return (
        f"{directory}: {what}. Expected {directory / LAYOUT_DIR}/ with "
        f"{', '.join(TRAIN_FILES)} and {TEST_FILE}, as extracted from {BINARY_URL}"
    )


def _required_dir(config: Mapping[str, Any]) -> str:
    directory = config.get("binary_dir")
    if not directory:
        raise ConfigError("data.source='binary' needs data.binary_dir (the folder of the archive)")
    return directory


def write_binary(
    directory: str | Path,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    records_per_file: int = RECORDS_PER_FILE,
) -> Path:
    """Writes `directory/cifar-10-batches-bin/` in the official layout; returns that folder.

    Other `records_per_file` than 10000 give files only the private reader accepts, so tests
    can use tiny files while `load_binary` still insists on the real sizes.
    """
    train_images, test_images = np.asarray(train_images), np.asarray(test_images)
    if len(train_images) != len(TRAIN_FILES) * records_per_file:
        raise ValueError(f"need {len(TRAIN_FILES) * records_per_file} train images")
    if len(test_images) != records_per_file:
        raise ValueError(f"need {records_per_file} test images")
    out = Path(directory) / LAYOUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    chunks = (
        np.split(train_images, len(TRAIN_FILES)),
        np.split(np.asarray(train_labels), len(TRAIN_FILES)),
    )
    names = [*TRAIN_FILES, TEST_FILE]
    for name, images, labels in zip(names, [*chunks[0], test_images], [*chunks[1], test_labels]):
        if images.shape[1:] != IMAGE_SHAPE or np.any((labels < 0) | (labels >= NUM_CLASSES)):
            raise ValueError(f"{name}: images must be 32x32x3 and labels in [0, 9]")
        planes = images.astype(np.uint8).transpose(0, 3, 1, 2).reshape(len(images), -1)
        record = np.concatenate([np.asarray(labels, np.uint8)[:, None], planes], axis=1)
        record.tofile(out / name)
    return out


# --- tensorflow-datasets ------------------------------------------------------------------


def load_tfds(data_dir: str | None) -> ImageData:
    """Reads a prepared tfds `cifar10` as array_record data sources, which need no TensorFlow.

    Preparing (downloading) it does need TensorFlow, so this never tries to: an unprepared
    dataset raises DataNotFoundError saying how to prepare it.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataNotFoundError(f"tensorflow-datasets cannot be imported: {err}") from err
    builder = tfds.builder("cifar10", data_dir=data_dir)
    if not builder.is_prepared():
        raise DataNotFoundError(
            f"tfds: cifar10 is not prepared in {builder.data_dir}. Prepare it once (needs "
            f"tensorflow and internet): tfds build cifar10 --file_format=array_record "
            f"--data_dir={builder.data_dir_root}"
        )
    try:
        splits = {name: builder.as_data_source(split=name) for name in ("train", "test")}
    except NotImplementedError as err:
        # Prepared as TFRecord (the default when tensorflow prepares it): no random access.
        raise DataNotFoundError(
            f"tfds: cifar10 in {builder.data_dir} is not in array_record format, which reading "
            f"without tensorflow needs; convert it: tfds convert_format "
            f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record"
        ) from err
    arrays = {
        name: _read_source(source, f"{builder.data_dir}:{name}") for name, source in splits.items()
    }
    return ImageData("cifar10", NUM_CLASSES, *arrays["train"], *arrays["test"])


def _read_source(source, where: str) -> tuple[np.ndarray, np.ndarray]:
    examples = source.__getitems__(list(range(len(source))))
    # tfds stores examples shuffled; its ids ("train_00042") are positions in the official
    # files, so sorting by id gives the binary loader's order and hence the same holdout.
    examples = sorted(examples, key=lambda e: e["id"])
    images = np.stack([e["image"] for e in examples]).astype(np.uint8)
    labels = np.asarray([e["label"] for e in examples], np.int32)
    if images.shape[1:] != IMAGE_SHAPE or np.any((labels < 0) | (labels >= NUM_CLASSES)):
        raise DataError(f"{where}: images {images.shape[1:]} or labels do not look like CIFAR-10")
    return images, labels


def _load_auto(tfds_data_dir: str | None, binary_dir: str | None) -> ImageData:
    """tfds if prepared there, else the binary layout if present, else say where we looked."""
    try:
        return load_tfds(tfds_data_dir)
    except DataNotFoundError as err:
        tfds_problem = str(err)
    if binary_dir and find_binary_layout(binary_dir) is not None:
        return load_binary(binary_dir)
    binary_problem = (
        _layout_problem(Path(binary_dir).expanduser().resolve())
        if binary_dir
        else "data.binary_dir is not set"
    )
    raise DataNotFoundError(
        "data.source='auto' found no CIFAR-10.\n"
        f"  tfds (data.tfds_data_dir={tfds_data_dir!r}): {tfds_problem}\n"
        f"  binary (data.binary_dir={binary_dir!r}): {binary_problem}\n"
        f"Fix: download {BINARY_URL} and extract it into data.binary_dir, or prepare tfds as "
        "above, or set data.source='synthetic' to try the code without CIFAR-10."
    )
