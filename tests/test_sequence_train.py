"""Motion recognition and frame prediction through the one training loop, the
moving-digits configs, frame-quality measures and sequence-config validation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import set_field, train

from experiments.configs import moving_digits
from experiments.describe import describe
from rvm.analysis.runs import NotARunError, read_run_info
from rvm.tasks.video import image_quality
from rvm.tasks.video import task as video_task
from rvm.train import loop
from rvm.train import sharding as shd
from rvm.train.checkpoint import Checkpoints
from rvm.train.config_check import validate


def tiny(variant: str = "smoke", **overrides):
    """16x16 frames, 2 epochs of 2 steps of 16 sequences (2 per simulated device)."""
    config = moving_digits.get_config(variant)
    config.data.update(num_train=32, num_test=20, num_frames=8, canvas=16, digit_size=8)
    config.data.radius = (2.0, 4.0)
    config.model.update(depth=2, base_width=4)
    config.update(batch_size=16, eval_batch_size=16, num_epochs=2, log_every_steps=2)
    for key, value in overrides.items():
        node, *path = key.split(".")
        section = config if not path else config[node]
        section[path[0] if path else node] = value
    return config


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def records(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_motion_run_resumes_exactly_and_reports_both_errors(tmp_path):
    # overlap coherence with Temporal Dropout: every random draw of a step must be replayed
    config = tiny(
        **{
            "train.scheme": "overlap",
            "train.min_clip": 3,
            "train.max_clip": 5,
            "train.max_overlap": 2,
            "model.td_rate": 0.5,
        }
    )
    straight = train(config, tmp_path / "straight")
    assert train(config, tmp_path / "split", max_steps=2) == {
        "step": 2,
        "finished": False,
    }
    split = train(config, tmp_path / "split")
    assert straight["finished"] and straight["step"] == 4

    run = loop.build_run(config, loop.load_data(config), shd.data_mesh())
    a = Checkpoints(tmp_path / "straight").restore(run.state, 4)
    b = Checkpoints(tmp_path / "split").restore(run.state, 4)
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(a.params), leaves(run.state.params)))
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert split == straight

    lines = records(tmp_path / "straight")
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in (
        "train_loss",
        "train_task_loss",
        "train_coherence",
        "train_frame_accuracy",
        "learning_rate",
        "sequences_per_sec",
        "eval_sec",
        "test_error",
        "test_anticipation_error",
        "test_loss",
    ):
        assert key in lines[0], key
    assert lines[0]["train_coherence"] > 0  # clips hand over at their end: overlaps disagree
    drop = lambda r: {k: v for k, v in r.items() if k not in ("sequences_per_sec", "eval_sec")}
    assert [drop(r) for r in records(tmp_path / "split")] == [drop(r) for r in lines]
    for key in ("test_error", "test_anticipation_error"):
        assert 0.0 <= straight[key] <= 100.0
        assert straight[key] * 20 / 100 == pytest.approx(round(straight[key] * 20 / 100))
    assert straight["test_error"] == lines[-1]["test_error"]
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert saved["task"] == "motion" and saved["train"]["scheme"] == "overlap"
    assert json.loads((tmp_path / "straight" / "results.json").read_text()) == straight
    with pytest.raises(NotARunError, match="is a 'motion' run"):  # the image-run report
        read_run_info(tmp_path / "straight")

    # Padded, masked batches (20 = 16 + 4 padded to 16) score what one unpadded batch does.
    variables = {"params": a.params, "batch_stats": a.batch_stats}
    test = loop.load_data(config).test
    padded = video_task.evaluate_motion(
        run.model, variables, test.frames, test.labels, 16, run.mesh
    )
    whole = video_task.evaluate_motion(run.model, variables, test.frames, test.labels, 20)
    assert padded == pytest.approx(whole, rel=1e-5)
    assert padded["error"] == straight["test_error"]


def test_prediction_run_reports_mse_psnr_ssim(tmp_path):
    config = tiny(
        "predict",
        **{"data.num_frames": 6, "data.num_input": 3, "model.depth": 1, "num_epochs": 1},
    )
    results = train(config, tmp_path)
    assert results["finished"] and results["step"] == 2
    for key in ("test_mse", "test_psnr", "test_ssim"):
        assert len(results[f"{key}_per_frame"]) == 3
        assert results[key] == pytest.approx(np.mean(results[f"{key}_per_frame"]))
    assert 0.0 < results["test_mse"] < 1.0
    assert -1.0 < results["test_ssim"] < 1.0
    # the mean of per-frame PSNRs is at least the PSNR of the mean MSE (convexity)
    assert results["test_psnr"] >= 10 * np.log10(1 / results["test_mse"]) - 1e-6
    (line,) = records(tmp_path)
    for key in ("train_loss", "train_mse", "test_mse", "test_psnr", "test_ssim"):
        assert key in line, key
    assert "test_mse_per_frame" not in line


@pytest.mark.parametrize("variant", moving_digits.variants())
def test_every_moving_digits_config_builds(variant):
    config = moving_digits.get_config(variant)
    info = describe(config)  # validates, builds the model and `jax.eval_shape`s its init
    assert info["params"] > 1000
    if variant.startswith("lstm"):
        cbm_info = describe(moving_digits.get_config(variant.replace("lstm", "cbm")))
        assert info["base_width"] < cbm_info["base_width"]
        assert abs(info["params"] - cbm_info["params"]) < 0.15 * cbm_info["params"]


def np_ssim(x, y, size=11, sigma=1.5, data_range=1.0):
    """SSIM of Wang et al. 2004 window by window: Gaussian-weighted moments, mean index."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for c in range(x.shape[-1]):
        for i in range(x.shape[0] - size + 1):
            for j in range(x.shape[1] - size + 1):
                a, b = x[i : i + size, j : j + size, c], y[i : i + size, j : j + size, c]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                num = (2 * ma * mb + c1) * (2 * cov + c2)
                values.append(num / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return np.mean(values)


def test_ssim_is_one_for_equal_images_and_matches_the_windowed_definition():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 13, 15, 2)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1).astype(np.float32)
    np.testing.assert_allclose(image_quality.ssim(x, x), [1.0, 1.0], atol=1e-6)
    got = np.asarray(image_quality.ssim(x, y))
    assert np.all(got < 0.9)
    np.testing.assert_allclose(got, [np_ssim(x[0], y[0]), np_ssim(x[1], y[1])], rtol=1e-4)
    with pytest.raises(ValueError, match="at least 11x11"):
        image_quality.ssim(x[:, :8], y[:, :8])


def test_psnr_against_a_hand_computation():
    target = jnp.zeros((3, 4, 4, 1))
    pred = target + jnp.asarray([0.1, 0.01, 0.5])[:, None, None, None]
    # MSE 1e-2, 1e-4, 0.25 of a unit range: 20, 40 and 10 log10(4) dB
    np.testing.assert_allclose(
        image_quality.psnr(pred, target), [20.0, 40.0, 10 * np.log10(4.0)], rtol=1e-5
    )
    half = target.at[:, :2].set(0.2)  # 0.2 off on half the pixels: MSE 0.02
    np.testing.assert_allclose(image_quality.psnr(half, target)[0], 10 * np.log10(50.0), 1e-5)


@pytest.mark.parametrize(
    "variant, field, value, message",
    [
        (
            "cbm4",
            "task",
            "video",
            "task='video' is not one of glimpses, image, motion, prediction, thinking, tracker, "
            "video_objects",
        ),
        ("cbm4", "model.kind", "rnn", "model.kind='rnn' is not one of cbm, lstm, gru, elman"),
        ("cbm4", "model.depth", 0, "model.depth=0 must be a positive integer"),
        ("cbm4", "model.norm", "layer", "model.norm='layer' is not one of none, batch, time"),
        ("cbm4", "model.td_rate", 1.0, "model.td_rate=1.0 must be a number in [0, 1)"),
        ("lstm4", "model.td_rate", 0.25, "model.td_rate=0.25 needs model.kind='cbm'"),
        ("cbm4", "model.match_params", True, "model.match_params=True sizes a ConvRNN stack"),
        ("cbm4", "train.scheme", "bptt", "train.scheme='bptt' is not one of full, tbptt"),
        ("overlap", "train.max_overlap", 8, "train.max_overlap=8 must be below train.min_clip=8"),
        ("overlap", "train.handover", "start", "train.handover='start' is not one of"),
        ("tbptt", "train.clip_len", 0, "train.clip_len=0 must be a positive integer"),
        ("cbm4", "data.speed", (2.0, 1.0), "data.speed=(2.0, 1.0) needs 0 < low <= high"),
        ("cbm4", "data.digit_size", 40, "data.digit_size=40 must be at most data.canvas=32"),
        ("cbm4", "optim.learning_rate", 0.0, "optim.learning_rate=0.0 must be a positive"),
        ("cbm4", "optim.name", "rmsprop", "optim.name='rmsprop' is not one of sgd, adam"),
        ("predict", "data.num_input", 20, "data.num_input=20 must be below data.num_frames"),
        ("predict", "data.canvas", 20, "data.canvas=20 cannot be decoded"),
        ("predict", "train.scheme", "tbptt", "train.scheme='tbptt': frame prediction"),
    ],
)
def test_bad_sequence_config_values_are_named(variant, field, value, message):
    config = moving_digits.get_config(variant)
    set_field(config, field, value)
    with pytest.raises(ValueError) as err:
        validate(config)
    assert message in str(err.value)


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown moving_digits config variant 'cbm3'"):
        moving_digits.get_config("cbm3")
