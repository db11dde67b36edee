"""Thinking longer, chosen on a split of its own: the validation split's seed stream, the
count chosen on it, Wilson intervals, Bansal et al.'s reference draw of n and k, and runs
recorded before these fields, which must still load and resume."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import train

from experiments.configs import prefix_sums as prefix_configs
from rvm.analysis.thinking import evaluate_run, read_curves, readings, wilson_interval
from rvm.data.mazes import maze_split, split_seed
from rvm.data.prefix_sums import prefix_sum_split
from rvm.models.thinking import ThinkingNet
from rvm.tasks.thinking import progressive
from rvm.tasks.thinking import task as thinking_task
from rvm.train.config_check import check_resume, validate

# --- Splits -------------------------------------------------------------------------------


def test_validation_split_has_its_own_stream_and_stream_0_keeps_the_old_seeds():
    seeds = {split: split_seed(0, 9, split) for split in ("train", "val", "test")}
    assert len(set(seeds.values())) == 3
    # the seeds the first runs were trained and tested with
    old = lambda index: int(np.random.SeedSequence([0, 9, index]).generate_state(1)[0])
    assert (seeds["train"], seeds["test"]) == (old(0), old(1))
    # another stream: other val and test splits of the same dataset seed
    assert split_seed(0, 9, "test", 1) not in seeds.values()
    assert split_seed(0, 9, "val", 1) != split_seed(0, 9, "test", 1)
    val, test = prefix_sum_split(0, 16, "val", 200), prefix_sum_split(0, 16, "test", 200)
    assert not {b.tobytes() for b in val.bits} & {b.tobytes() for b in test.bits}
    mazes = maze_split(0, 4, "val", 5, stream=1)
    assert not np.array_equal(mazes.images, maze_split(0, 4, "val", 5).images)
    with pytest.raises(ValueError, match="split='dev'"):
        split_seed(0, 9, "dev")
    with pytest.raises(ValueError, match="stream=-1"):
        split_seed(0, 9, "val", -1)


def test_chosen_count_is_the_fewest_among_the_best():
    assert thinking_task.choose_count([0, 3, 7, 7, 5]) == 3
    assert thinking_task.choose_count([4]) == 1


# --- Intervals ------------------------------------------------------------------------------


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(27.75, abs=0.01)  # (z^2 / n) / (1 + z^2 / n)
    lo, hi = wilson_interval(1000, 1000)
    assert hi == 100.0 and lo == pytest.approx(99.617, abs=0.001)
    lo, hi = wilson_interval(50, 100)
    assert 50 - lo == pytest.approx(hi - 50) and hi - lo == pytest.approx(19.2, abs=0.1)
    # it narrows with more examples, around the same proportion
    assert np.diff(wilson_interval(500, 1000)) < np.diff(wilson_interval(50, 100))
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)


def test_readings_come_from_the_counts_at_the_chosen_count():
    curve = {
        "examples": 20,
        "solved": [0, 10, 16, 12],
        "halt_solved": 14,
        "halt_iterations": 2.5,
        "chosen_iterations": 2,  # chosen on validation: not the test curve's best (3)
    }
    r = readings(curve, m=1)
    assert r["trained"]["accuracy"] == 0.0 and r["chosen"]["accuracy"] == 50.0
    assert r["max"]["iterations"] == 4 and r["max"]["accuracy"] == 60.0
    assert r["halting"]["accuracy"] == 70.0
    assert r["chosen"]["interval"] == pytest.approx(wilson_interval(10, 20))
    assert "chosen" not in readings({**curve, "chosen_iterations": None}, m=1)


# --- Bansal et al.'s reference draw ----------------------------------------------------------


def test_reference_draw_covers_n_and_k_with_n_plus_k_at_most_m():
    train = prefix_configs.get_config().train
    train.iterations, train.grad_iterations, train.draw = 6, 2, "reference"
    keys = jax.random.split(jax.random.key(0), 400)
    n, k = (
        np.asarray(a) for a in jax.vmap(lambda key: progressive.sample_counts(key, train))(keys)
    )
    m = train.iterations
    assert set(n.tolist()) == set(range(m))
    assert k.min() == 1 and np.all(n + k <= m)
    assert set(k[n == 0].tolist()) == set(range(1, m + 1))
    # the fixed-k draw beside it
    train.draw = "fixed_k"
    n, k = progressive.sample_counts(keys[0], train)
    assert k == train.grad_iterations and 0 <= int(n) <= m - k


def test_a_drawn_k_runs_k_iterations_with_gradient():
    model = ThinkingNet(width=4, blocks=1, dims=1)
    x = jax.random.bernoulli(jax.random.key(1), 0.5, (2, 10, 1)).astype(jnp.float32)
    labels = (jnp.cumsum(x[..., 0], axis=1) % 2).astype(jnp.int32)
    params = model.init(jax.random.key(0), x)["params"]

    def grads(k, most=None):
        loss = lambda p: progressive.per_position_loss(
            progressive.truncated_logits(model, p, x, 1, k, most), labels
        )
        return jax.grad(loss)(params)

    static = {k: jax.tree.leaves(grads(k)) for k in (2, 3)}
    # the two static counts differ, so a drawn k that ran the wrong count would be seen
    flat = {k: np.concatenate([np.ravel(g) for g in leaves]) for k, leaves in static.items()}
    assert not np.allclose(flat[2], flat[3])
    for k in (2, 3):
        drawn = jax.tree.leaves(grads(jnp.int32(k), most=5))
        for a, b in zip(drawn, static[k]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# --- Configs, old runs, the loop ------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("data.num_val", -1, "data.num_val=-1"),
        ("data.eval_stream", -2, "data.eval_stream=-2"),
        ("train.draw", "triangular", "train.draw='triangular'"),
    ],
)
def test_bad_new_fields_are_refused(field, value, message):
    config = prefix_configs.get_config("smoke")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_reference_draw_needs_uniform_counts():
    config = prefix_configs.get_config("smoke")
    config.train.draw, config.train.counts = "reference", "poisson"
    with pytest.raises(ValueError, match="train.draw='reference' draws uniform counts"):
        validate(config)


def _old(config):
    """The config as a run recorded before the validation split and the draw were fields."""
    old = json.loads(config.to_json())
    for section, name in (("data", "num_val"), ("data", "eval_stream"), ("train", "draw")):
        del old[section][name]
    return old


def test_a_run_recorded_before_the_new_fields_resumes_and_loads_as_it_was(tmp_path):
    config = prefix_configs.get_config("smoke")
    config.data.num_val, config.data.eval_stream = 0, 0
    check_resume(config, tmp_path, _old(config))  # the old defaults: the same run
    config.data.num_val = 32
    with pytest.raises(ValueError, match="data.num_val: saved 0, now 32"):
        check_resume(config, tmp_path, _old(config))
    # loaded without the fields: no validation split, the test split of stream 0
    data = thinking_task.load_data(ml_collections.ConfigDict(_old(config)))
    assert data.vals == {}
    np.testing.assert_array_equal(
        data.tests[8].inputs[..., 0], prefix_sum_split(0, 8, "test", 64).bits
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    config = prefix_configs.get_config("smoke")
    config.train.draw = "reference"
    workdir = tmp_path_factory.mktemp("ps_smoke")
    return config, workdir, train(config, workdir)


def test_the_epochs_watch_validation_and_the_count_is_chosen_on_it(smoke_run):
    config, workdir, results = smoke_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all("val_error" in r and "test_error" not in r for r in records)
    assert "train_grad_iterations" in records[0]  # the reference draw's k, drawn per step
    assert results["best_val_epoch"] in (1, 2) and "test_error_at_best_val" not in results
    most = config.eval.factor * config.train.iterations
    for curve in results["sizes"].values():
        val = curve["val"]
        assert val["examples"] == config.data.num_val and len(val["solved"]) == most
        assert curve["chosen_iterations"] == thinking_task.choose_count(val["solved"])
        assert curve["accuracy_at_chosen"] == curve["accuracy"][curve["chosen_iterations"] - 1]


def test_old_runs_are_evaluated_again_on_fresh_splits(smoke_run, tmp_path):
    config, workdir, _ = smoke_run
    old = tmp_path / "old"
    old.mkdir()
    for name in ("metrics.jsonl", "results.json"):
        (old / name).write_text((workdir / name).read_text())
    shutil.copytree(workdir / "checkpoints", old / "checkpoints")
    (old / "config.json").write_text(json.dumps(_old(config)))
    splits = {"num_val": 16, "num_test": 24, "eval_stream": 1}
    run = evaluate_run(old, splits=splits)
    curve = run["results"]["sizes"]["8"]
    assert curve["examples"] == 24 and curve["val"]["examples"] == 16
    assert run["results"]["evaluated"]["eval_stream"] == 1
    # the same settings reuse the entry; other ones evaluate again
    again = evaluate_run(old, splits=splits, done=run["results"])
    assert again["results"] is not run["results"] and again["results"] == run["results"]
    fake = {**run["results"], "sizes": {}}
    assert evaluate_run(old, splits=splits, done=fake)["results"]["sizes"] == {}
    changed = evaluate_run(old, splits={**splits, "eval_stream": 2}, done=fake)
    assert changed["results"]["sizes"]["8"]["examples"] == 24
    assert read_curves(tmp_path / "none.json") == {}
