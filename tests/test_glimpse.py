"""Glimpse pyramids against a NumPy reference, box coordinates, and RAM's gradient paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rvm.models import glimpse
from rvm.models.ram import RAM, reinforce_terms

FINE = 4  # the reference works on a grid 4x finer than the pixels


def reference_crop(image, center, width, size):
    """The area-averaged crop by brute force: every pixel split into FINE x FINE equal
    parts, the frame padded with zeros, the crop's fine cells averaged in blocks."""
    fine = np.repeat(np.repeat(image, FINE, 0), FINE, 1)
    pad = 64 * FINE
    fine = np.pad(fine, ((pad, pad), (pad, pad), (0, 0)))
    side = int(round(width * FINE))
    x0, y0 = (int(round((c - width / 2) * FINE)) + pad for c in center)
    cells = fine[y0 : y0 + side, x0 : x0 + side]
    block = side // size
    return cells.reshape(size, block, size, block, -1).mean(axis=(1, 3))


# (centre x, centre y, first width): the widest crops (x4) leave the frame on some side
CASES = [(5.0, 5.0, 4.0), (1.5, 8.25, 2.0), (9.75, 0.5, 3.0)]


@pytest.mark.parametrize("cx,cy,width", CASES)
@pytest.mark.parametrize("window", [None, 18])
def test_pyramid_matches_numpy_reference(cx, cy, width, window):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (10, 11, 2)).astype(np.float32)
    size, scales = 2, 3
    if window is not None:
        assert window >= glimpse.window_for(width, scales)
    got = glimpse.pyramid(
        jnp.asarray(image[None]),
        jnp.array([[cx, cy]]),
        jnp.array([width]),
        size=size,
        scales=scales,
        window=window,
    )[0]
    want = np.concatenate(
        [reference_crop(image, (cx, cy), width * 2**i, size) for i in range(scales)], -1
    )
    assert got.shape == (size, size, scales * 2)
    # the widest crop reaches outside the frame, so its zeros matter
    assert np.max(want[..., -2:]) < np.max(image)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_crop_outside_the_frame_is_zero():
    image = jnp.ones((1, 8, 8, 1))
    half_out = glimpse.pyramid(image, jnp.array([[0.0, 4.0]]), jnp.array([4.0]), size=2, scales=1)
    # left column of the crop lies wholly left of the frame: zero padding
    np.testing.assert_allclose(np.asarray(half_out[0, :, :, 0]), [[0.0, 1.0], [0.0, 1.0]])


def test_box_round_trip_frame_crop_frame():
    rng = np.random.default_rng(1)
    box = jnp.asarray(rng.uniform(0, 50, (5, 4)), jnp.float32)
    center = jnp.asarray(rng.uniform(0, 60, (5, 2)), jnp.float32)
    width = jnp.asarray(rng.uniform(4, 40, (5,)), jnp.float32)
    in_crop = glimpse.box_to_crop(box, center, width)
    assert not np.allclose(np.asarray(in_crop), np.asarray(box))
    np.testing.assert_allclose(
        np.asarray(glimpse.crop_to_box(in_crop, center, width)), np.asarray(box), rtol=1e-5
    )
    # the box the crop is built around sits at [1/4, 3/4] of a crop twice its size
    square = jnp.array([[10.0, 20.0, 18.0, 28.0]])
    c, w = glimpse.box_crop(square, 2.0, 1.0)
    np.testing.assert_allclose(
        np.asarray(glimpse.box_to_crop(square, c, w)), [[0.25] * 2 + [0.75] * 2]
    )


def test_iou():
    a = jnp.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = jnp.array([[1.0, 0.0, 3.0, 2.0], [2.0, 2.0, 3.0, 3.0]])
    np.testing.assert_allclose(np.asarray(glimpse.iou(a, b)), [1 / 3, 0.0])


def _grads(loss_of):
    model = RAM(size=4, scales=2, width=6.0, glimpses=3, hidden=16, features=4)
    images = jax.random.uniform(jax.random.key(1), (4, 20, 20, 1))
    labels = jnp.array([0, 1, 2, 3])
    params = model.init(jax.random.key(0), images)["params"]

    def loss(p):
        out = model.apply({"params": p}, images, train=True, key=jax.random.key(2))
        return loss_of(out, labels)

    return jax.grad(loss)(params)


def _norms(grads):
    return {
        k: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(v))) for k, v in grads.items()
    }


def test_reinforce_reaches_the_location_network_only():
    norms = _norms(_grads(lambda out, y: reinforce_terms(out, y)[0]))
    assert norms["locator"] > 0
    assert all(v == 0 for k, v in norms.items() if k != "locator"), norms


def test_classification_does_not_pass_through_the_locations():
    def ce(out, labels):
        return jnp.mean(-jax.nn.log_softmax(out["logits"])[jnp.arange(4), labels])

    norms = _norms(_grads(ce))
    assert norms["encoder"] > 0 and norms["core"] > 0 and norms["classifier"] > 0
    assert norms["locator"] == 0 and norms["baseline"] == 0, norms


def test_policies_place_glimpses_as_documented():
    images = jax.random.uniform(jax.random.key(1), (3, 20, 20, 1))
    for policy in ("learned", "random", "center"):
        model = RAM(size=4, scales=2, width=6.0, glimpses=3, hidden=8, features=4, policy=policy)
        variables = model.init(jax.random.key(0), images)
        locations = model.apply(variables, images, key=jax.random.key(5))["locations"]
        assert locations.shape == (3, 3, 2)
        if policy == "center":
            assert np.all(np.asarray(locations) == 0)
        elif policy == "random":
            assert np.all(np.abs(np.asarray(locations)) <= 1) and np.std(locations) > 0.2
        else:
            assert np.all(np.asarray(locations[0]) == 0) and np.any(np.asarray(locations[1:]) != 0)


def test_summary_sets_runs_against_the_targets(tmp_path):
    import json

    from experiments.configs import glimpses as glimpses_config
    from experiments.configs import tracker as tracker_config
    from rvm.analysis.where_to_look import write_summary

    scores = {
        "mean_iou": 0.8,
        "success_rate": 0.85,
        "failure_rate": 0.02,
        "auc": 0.7,
        "recovery": 0.9,
        "occlusions": 10,
        "failure_rate_occluded": 0.1,
    }
    speeds = {"1": 900.0, "32": 5e3}
    tracked = lambda scores: {"test": scores, "test_no_reset": scores, "steps_per_sec": speeds}
    small = tracker_config.get_config("lstm")
    small.model.size = 24
    long = tracker_config.get_config("lstm")
    long.num_epochs *= 2
    short_random = glimpses_config.get_config("cluttered_random")
    short_random.num_epochs = 5
    glimpsed = lambda error: {
        "test_error": error,
        "test_error_interval": [error - 1, error + 1],
        "val_error": error,
    }
    runs = {  # "small", "long" first: LSTMs with no feed-forward run trained alike
        "small": (small, tracked(scores)),
        "long": (long, tracked(scores)),
        "track": (tracker_config.get_config("lstm"), tracked(scores)),
        "ff": (
            tracker_config.get_config("feedforward"),
            tracked(dict(scores, failure_rate_occluded=0.2)),
        ),
        "ram": (
            glimpses_config.get_config("cluttered_ram"),
            {"test_error": 6.0, "test_error_interval": [5.0, 7.0], "val_error": 6.5},
        ),
        # random locations at a shorter budget first: not the learned run's baseline
        "random_short": (short_random, glimpsed(30.0)),
        "random": (glimpses_config.get_config("cluttered_random"), glimpsed(9.0)),
    }
    for name in ("ram", "random_short", "random"):
        runs[name][1].update(flops_per_image={"60": 1e6, "100": 1e6}, shown_predictions=[1] * 2)
    runs["ram"][1]["shown_locations"] = [[[0.0, 0.0]] * 2] * 3
    for name in ("track", "ff", "small", "long"):
        runs[name][1].update(test_frames=8, shown_ious=[[1.0] * 8], shown_occluded=[[False] * 8])
    for name, (config, results) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config.to_json())
        results.update(params=10, step=5)
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    text = write_summary([tmp_path / n for n in runs], tmp_path, "a test VM", "run.sh")
    assert "test error 6.00% against the target 5.0%: missed by 1" in text
    assert "success_rate 0.850 (>= 0.9): missed by 0.05" in text
    assert "mean_iou 0.800 (>= 0.75): met" in text
    assert "900 track steps/s at batch 1 (>= 1,000): missed by 100" in text
    # Each LSTM is set against the feed-forward run of its own network and budget only,
    # RAM against random locations at its own budget.
    assert "LSTM track 0.100 against feed-forward ff 0.200 (LSTM below): met" in text
    assert "LSTM small" not in text and "LSTM long" not in text
    assert "- ram: +3.00 points better than random locations (target at least 2): met" in text
    assert "= 1.00" in text  # RAM's operations per image do not grow with the canvas
    assert (tmp_path / "tracker_iou.png").is_file() and (
        tmp_path / "glimpse_locations.png"
    ).is_file()
