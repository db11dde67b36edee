"""The data layer: CIFAR-10 binary reading and validation, holdout, synthetic data, pipeline."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rvm.data import (
    ImageData,
    augment,
    batch_indices,
    cifar10,
    eval_batches,
    load_images,
    make_synthetic,
    normalization_stats,
    normalize,
    write_binary,
)
from rvm.data.cifar10 import DataNotFoundError, hold_out

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
SMALL = 3  # records per file in the tiny files most tests use


def fake_split(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def record_bytes(images, labels):
    """The official record layout, spelled out independently of the code under test."""
    rows = [
        np.concatenate([[label], img[:, :, 0].ravel(), img[:, :, 1].ravel(), img[:, :, 2].ravel()])
        for img, label in zip(images, labels)
    ]
    return np.asarray(rows, np.uint8).tobytes()


@pytest.fixture
def tiny_layout(tmp_path):
    """A layout of 5 x SMALL train and SMALL test records; returns (folder, arrays)."""
    train, test = fake_split(5 * SMALL, 0), fake_split(SMALL, 1)
    folder = write_binary(tmp_path, *train, *test, records_per_file=SMALL)
    return folder, (train, test)


def config(**fields):
    return ml_collections.ConfigDict(fields)


# --- Binary archive ---------------------------------------------------------------------


def test_reader_matches_hand_built_records_exactly(tmp_path):
    train, test = fake_split(5 * SMALL, 2), fake_split(SMALL, 3)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for i, name in enumerate(cifar10.TRAIN_FILES):
        part = slice(i * SMALL, (i + 1) * SMALL)
        (folder / name).write_bytes(record_bytes(train[0][part], train[1][part]))
    (folder / "test_batch.bin").write_bytes(record_bytes(*test))
    for directory in (tmp_path, folder):  # the parent or the layout folder itself
        data = cifar10._load_binary(directory, SMALL)
        np.testing.assert_array_equal(data.train_images, train[0])
        np.testing.assert_array_equal(data.train_labels, train[1])
        np.testing.assert_array_equal(data.test_images, test[0])
        np.testing.assert_array_equal(data.test_labels, test[1])
        assert data.train_labels.dtype == np.int32 and data.num_classes == 10
    # Plane order: byte 1 is R of pixel (0, 0), byte 2 R of (0, 1), byte 1025 G of (0, 0).
    raw = (folder / "data_batch_1.bin").read_bytes()
    img = data.train_images[0]
    assert (raw[1], raw[2], raw[1025], raw[2049]) == (
        img[0, 0, 0],
        img[0, 1, 0],
        img[0, 0, 1],
        img[0, 0, 2],
    )


def test_writer_produces_the_official_bytes(tiny_layout):
    folder, (train, test) = tiny_layout
    assert (folder / "data_batch_2.bin").read_bytes() == record_bytes(
        train[0][SMALL : 2 * SMALL], train[1][SMALL : 2 * SMALL]
    )
    assert (folder / "test_batch.bin").read_bytes() == record_bytes(*test)


def test_public_loader_insists_on_10000_records(tiny_layout):
    folder, _ = tiny_layout
    path = re.escape(str(folder / "data_batch_1.bin"))
    with pytest.raises(ValueError, match=f"{path}: 9219 bytes = 3 records, expected 30730000"):
        cifar10.load_binary(folder.parent)


def test_truncated_file_is_rejected_naming_it(tiny_layout):
    folder, _ = tiny_layout
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=re.escape(f"{path}: 9218 bytes, expected 9219 bytes")):
        cifar10._load_binary(folder, SMALL)


def test_wrong_record_count_is_rejected_naming_it(tiny_layout):
    folder, _ = tiny_layout
    path = folder / "test_batch.bin"
    path.write_bytes(path.read_bytes() * 2)
    with pytest.raises(ValueError, match=re.escape(f"{path}: 18438 bytes = 6 records")):
        cifar10._load_binary(folder, SMALL)


def test_out_of_range_label_is_rejected_naming_it(tiny_layout):
    folder, _ = tiny_layout
    path = folder / "data_batch_4.bin"
    raw = bytearray(path.read_bytes())
    raw[cifar10.RECORD_BYTES] = 10  # label of the second record
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 1 has label 10")):
        cifar10._load_binary(folder, SMALL)


def test_missing_file_is_rejected_naming_it(tiny_layout):
    folder, _ = tiny_layout
    (folder / "data_batch_5.bin").unlink()
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{folder / 'data_batch_5.bin'}: missing")
    ):
        cifar10._load_binary(folder, SMALL)


def test_wrong_layouts_are_rejected_naming_the_folder(tiny_layout, tmp_path):
    folder, _ = tiny_layout
    flat = tmp_path / "flat"
    folder.rename(flat)  # the files, but not in cifar-10-batches-bin/
    with pytest.raises(
        DataNotFoundError, match=re.escape(f"{flat}: holds data_batch_1.bin directly")
    ):
        cifar10._load_binary(flat, SMALL)
    pickled = tmp_path / "py"
    (pickled / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(
        DataNotFoundError, match="python .pickle. version, which is never unpickled"
    ):
        load_images(config(source="binary", binary_dir=str(pickled)))


def test_unknown_source_names_field_value_and_choices():
    with pytest.raises(
        ValueError, match="data.source='bogus' is not one of tfds, binary, synthetic"
    ):
        load_images(config(source="bogus"))


def test_auto_uses_binary_when_tfds_is_not_prepared(tiny_layout, tmp_path, monkeypatch):
    folder, (train, _) = tiny_layout
    monkeypatch.setattr(cifar10, "RECORDS_PER_FILE", SMALL)  # keep the files tiny
    empty = str(tmp_path / "no_tfds")
    with pytest.raises(DataNotFoundError, match="cifar10 is not prepared in .*no_tfds"):
        load_images(config(source="tfds", tfds_data_dir=empty))
    data = load_images(config(source="auto", tfds_data_dir=empty, binary_dir=str(folder.parent)))
    np.testing.assert_array_equal(data.train_images, train[0])


def test_auto_with_nothing_names_both_places(tmp_path):
    cfg = config(source="auto", tfds_data_dir=str(tmp_path / "t"), binary_dir=str(tmp_path / "b"))
    with pytest.raises(DataNotFoundError) as err:
        load_images(cfg)
    message = str(err.value)
    assert str(tmp_path / "t") in message and str(tmp_path / "b") in message
    assert "cifar-10-binary.tar.gz" in message and "synthetic" in message


# --- Holdout, synthetic data, ImageData ------------------------------------------------------


def indexed_data(n):
    """Train images whose first two bytes spell their index, to track them through splits."""
    images = np.zeros((n, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    labels = (np.arange(n) % 10).astype(np.int32)
    return ImageData("t", 10, images, labels, images[:2], labels[:2])


def ids(images):
    return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


def test_holdout_is_disjoint_complete_and_deterministic():
    data = indexed_data(1000)
    split = hold_out(data, 100, seed=7)
    val, train = ids(split.val_images), ids(split.train_images)
    assert len(val) == 100 and len(train) == 900
    assert not set(val) & set(train) and set(val) | set(train) == set(range(1000))
    np.testing.assert_array_equal(split.val_labels, val % 10)  # labels travel with images
    np.testing.assert_array_equal(ids(hold_out(data, 100, seed=7).val_images), val)
    assert set(ids(hold_out(data, 100, seed=8).val_images)) != set(val)
    assert hold_out(data, 0, seed=7).val_images is None
    with pytest.raises(ValueError, match="data.holdout=1000"):
        hold_out(data, 1000, seed=7)


def test_load_images_synthetic_with_holdout():
    cfg = config(source="synthetic", synthetic_train=200, synthetic_test=50, seed=3)
    data = load_images(ml_collections.ConfigDict({**cfg, "holdout": 40, "holdout_seed": 1}))
    assert data.train_images.shape == (160, 32, 32, 3) and data.val_images.shape == (40, 32, 32, 3)
    assert data.test_images.shape == (50, 32, 32, 3) and data.name == "synthetic"


def test_synthetic_is_deterministic_per_seed_and_balanced():
    a, b, c = make_synthetic(100, 30, 0), make_synthetic(100, 30, 0), make_synthetic(100, 30, 1)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.train_images, c.train_images)
    assert a.train_images.dtype == np.uint8 and a.train_labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(a.train_labels), [10] * 10)
    # The test set does not depend on how many training images were drawn.
    np.testing.assert_array_equal(make_synthetic(50, 30, 0).test_images, a.test_images)
    assert make_synthetic(8, 4, 0, num_classes=3, image_size=16).train_images.shape == (
        8,
        16,
        16,
        3,
    )


def test_image_data_rejects_wrong_dtypes():
    images, labels = np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="train_images must be uint8"):
        ImageData("x", 10, images.astype(np.float32), labels, images, labels)
    with pytest.raises(ValueError, match="test_labels must be int32"):
        ImageData("x", 10, images, labels, images, labels[:3])


# --- Pipeline -------------------------------------------------------------------------------


def test_normalization_stats_match_numpy():
    x = np.random.default_rng(0).integers(0, 256, (64, 6, 5, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = 17  # a constant feature: std must not be 0
    x64 = x.astype(np.float64)
    mean, std = normalization_stats(x, "feature")
    assert mean.dtype == jnp.float32 and mean.shape == std.shape == (6, 5, 3)
    expected = x64.std(0)
    expected[0, 0, 0] = 1.0
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, expected, rtol=1e-5)
    mean, std = normalization_stats(x, "channel")
    assert mean.shape == (1, 1, 3)
    np.testing.assert_allclose(mean.ravel(), x64.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std.ravel(), x64.std((0, 1, 2)), rtol=1e-5)
    z = np.asarray(normalize(jnp.asarray(x, jnp.float32), *normalization_stats(x)))
    np.testing.assert_allclose(z[:, 1:].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z[:, 1:].std(0), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="data.normalization='pixel'"):
        normalization_stats(x, "pixel")


def test_batch_indices_are_epoch_permutations():
    n, bs = 10, 3  # 3 steps per epoch, one example dropped per epoch
    epochs = [
        np.concatenate([batch_indices(5, e * 3 + s, n, bs) for s in range(3)]) for e in range(4)
    ]
    for epoch in epochs:
        assert len(epoch) == 9 and len(set(epoch.tolist())) == 9 and epoch.max() < n
    assert len({tuple(e) for e in epochs}) == 4  # a new order every epoch
    assert len({(set(range(n)) - set(e.tolist())).pop() for e in epochs}) > 1  # dropped varies
    np.testing.assert_array_equal(batch_indices(5, 7, n, bs), batch_indices(5, 7, n, bs))
    assert not np.array_equal(batch_indices(5, 7, n, bs), batch_indices(6, 7, n, bs))
    jitted = jax.jit(lambda step: batch_indices(5, step, n, bs))
    for step in (0, 4, 11):
        np.testing.assert_array_equal(jitted(step), batch_indices(5, step, n, bs))
    np.testing.assert_array_equal(batch_indices(jax.random.key(5), 4, n, bs), epochs[1][3:6])
    with pytest.raises(ValueError, match="batch_size=11 exceeds the 10"):
        batch_indices(5, 0, n, 11)


def test_augment_flips_a_random_half_exactly():
    x = np.random.default_rng(0).integers(0, 256, (256, 8, 8, 3), dtype=np.uint8)
    out = np.asarray(augment(x, jax.random.key(1), flip=True, crop=False))
    assert out.dtype == np.float32
    same = np.all(out == x, axis=(1, 2, 3))
    flipped = np.all(out == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same ^ flipped)  # every image is itself or its mirror image, never both
    assert 0.35 < flipped.mean() < 0.65
    again = np.asarray(
        jax.jit(augment, static_argnames=("flip", "crop"))(
            x, jax.random.key(1), flip=True, crop=False
        )
    )
    np.testing.assert_array_equal(again, out)
    other = np.asarray(augment(x, jax.random.key(2), flip=True, crop=False))
    assert not np.array_equal(other, out)
    np.testing.assert_array_equal(augment(x, jax.random.key(1), flip=False, crop=False), x)


def test_augment_crops_windows_of_the_zero_padded_image():
    x = np.random.default_rng(0).integers(1, 256, (256, 6, 6, 3), dtype=np.uint8)
    out = np.asarray(augment(x, jax.random.key(0), flip=False, crop=True, pad=2))
    assert out.shape == x.shape
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = []
    for img, pad_img in zip(out, padded):
        found = [
            (i, j)
            for i in range(5)
            for j in range(5)
            if np.array_equal(pad_img[i : i + 6, j : j + 6], img)
        ]
        assert len(found) == 1
        offsets.append(found[0])
    # Every shift from -pad to +pad occurs, the extreme ones included.
    assert set(offsets) == {(i, j) for i in range(5) for j in range(5)}
    np.testing.assert_array_equal(augment(x, jax.random.key(0), flip=False, crop=True, pad=0), x)


def test_eval_batches_cover_every_example_once():
    images, labels = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3), np.arange(10)
    batches = list(eval_batches(images, labels, 4))
    assert [b[0].shape for b in batches] == [(4, 2, 2, 3)] * 3
    masks = np.concatenate([m for _, _, m in batches])
    np.testing.assert_array_equal(masks, [1] * 10 + [0] * 2)
    kept = masks.astype(bool)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[kept], labels)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches])[kept], images)
    assert [m.sum() for _, _, m in eval_batches(images, labels, 5)] == [5, 5]
    assert list(eval_batches(images[:0], labels[:0], 4)) == []


def test_eval_batches_pad_labels_of_any_shape():
    """Labels that are arrays themselves (a video's masks) are padded like the inputs."""
    videos, masks = np.ones((3, 2, 4, 4, 1), np.float32), np.ones((3, 2, 4, 4), np.uint8)
    _, (x, y, w) = eval_batches(videos, masks, 2)
    assert (x.shape, y.shape) == ((2, 2, 4, 4, 1), (2, 2, 4, 4))
    np.testing.assert_array_equal(w, [1, 0])
    assert y[0].all() and not y[1].any()


# --- The real data, where this machine keeps a copy --------------------------------------------


@pytest.mark.skipif(not (SHARED_CIFAR / "build.py").exists(), reason="no shared CIFAR-10 copy")
def test_loads_the_shared_cifar10_copy(tmp_path):
    subprocess.run([sys.executable, str(SHARED_CIFAR / "build.py"), str(tmp_path)], check=True)
    data = load_images(config(source="binary", binary_dir=str(tmp_path), holdout=0))
    assert data.train_images.shape == (50000, 32, 32, 3) and data.test_images.shape == (
        10000,
        32,
        32,
        3,
    )
    assert data.train_labels.min() >= 0 and data.train_labels.max() <= 9
    assert data.test_labels.min() >= 0 and data.test_labels.max() <= 9
    np.testing.assert_array_equal(np.bincount(data.train_labels, minlength=10), [5000] * 10)
    assert 100 < data.train_images.mean() < 150  # real photographs, not noise or zeros
