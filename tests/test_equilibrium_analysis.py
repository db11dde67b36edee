"""The readings that say why a thinking net at equilibrium learns: contraction, gradient
agreement and reach (`rvm.analysis.equilibrium`)."""

import jax
import jax.numpy as jnp
import numpy as np

from rvm.analysis import equilibrium as diag
from rvm.models.equilibrium import Backward, Solver, Spec
from rvm.models.thinking import ThinkingNet


def _net(solver: Solver, width: int = 16) -> ThinkingNet:
    spec = Spec("none", solver, Backward("implicit", Solver("iterate", 1e-7, 400)))
    return ThinkingNet(width, 1, True, 1, 2, "none", 1, spec)


def _bits(n: int, length: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).integers(0, 2, (n, length, 1)), jnp.float32)


def test_spectral_radius_of_a_linear_map():
    # Per example a diagonal map with largest |eigenvalue| 0.9 and 0.5: the estimate finds each.
    scales = jnp.array([[0.9, -0.3, 0.1], [0.2, 0.5, -0.4]])
    f = lambda z: scales * z + 1.0
    radius = diag.spectral_radius(f, jnp.ones((2, 3)), jax.random.key(1), steps=200)
    np.testing.assert_allclose(radius, [0.9, 0.5], rtol=1e-3)


def test_reach_ends_at_the_receptive_field():
    # embed 1 + two plain iterations of 3 width-3 convs (recall, block conv1, conv2) = 7
    # positions; a pointwise head: bit 0 cannot change a prediction beyond position 7.
    model = _net(Solver("iterate", 1e-9, 2))
    bits = _bits(64, 16)
    params = model.init(jax.random.key(0), bits[:1])["params"]
    params = jax.tree.map(lambda p: 0.5 * p, params)
    flips = diag.reach(model, params, bits)
    assert flips.shape == (16,)
    assert np.all(flips[8:] == 0) and np.sum(flips[:8]) > 0


def test_gradient_agreement_at_a_fixed_point_and_away_from_it():
    model = _net(Solver("iterate", 1e-7, 400))
    bits = _bits(8, 8)
    labels = jnp.asarray(np.cumsum(np.asarray(bits[..., 0]), 1) % 2, jnp.int32)
    params = model.init(jax.random.key(0), bits[:1])["params"]
    params = jax.tree.map(lambda p: 0.5 * p, params)  # a contractive iteration
    h, _ = diag.fixed_point(model, params, bits)
    radius = diag.spectral_radius(diag.iteration(model, params, bits), h, jax.random.key(2))
    assert np.all(radius < 0.9)
    # Unrolled to convergence, autodiff through every step is the implicit gradient;
    # unrolled one step, it is another gradient, and the cosine says so.
    assert diag.gradient_agreement(model, params, bits, labels, unrolled=200) > 0.9999
    assert diag.gradient_agreement(model, params, bits, labels, unrolled=1) < 0.99


def test_diagnose_and_solver_budgets_read_a_trained_run(tmp_path):
    from helpers import train

    from experiments.configs import equilibrium as eq_configs
    from experiments.configs import prefix_sums
    from rvm.train import metrics

    config = prefix_sums.get_config("smoke")
    config.num_epochs = 1
    config.train.scheme = "equilibrium"
    config.model.norm = "layer"
    config.equilibrium = eq_configs.solver_section(norm="layer", max_iter=8)
    train(config, tmp_path / "run")
    (row,) = rows = [diag.diagnose(tmp_path / "run", num=16, unrolled=20, max_iter=50)]
    assert (row["run"], row["step"], row["backward"]) == ("run", 4, "implicit")
    for net in ("initial", "trained"):
        r = row[net]
        assert 0 <= r["position_accuracy"] <= 1 and 1 <= r["solver_iterations"] <= 50
        assert -1 <= r["gradient_cosine"] <= 1 and r["spectral_radius"] > 0
        assert len(r["reach"]) == 3 and all(0 <= v <= 1 for v in r["reach"])
    assert row["initial"] != row["trained"]  # the checkpoint's parameters, not the fresh ones
    table = diag.markdown(rows)
    assert "\n| run | initial | implicit |" in table and "\n| run | step 4 | implicit |" in table

    # At the trained cap, the validation reading is the run's own last epoch record; at a
    # cap of 1, every batch stops there unconverged.
    budgets = diag.solver_budgets(tmp_path / "run", [1, 8])
    capped, own = budgets["sizes"][str(config.data.train_size)]
    last = metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["step"] == budgets["step"] == 4 and budgets["trained_max_iter"] == 8
    assert own["solver_accuracy"] == last["val_solver_accuracy"]
    assert own["solver_iterations"] == last["val_solver_iterations"]
    assert own["examples"] == config.data.num_val
    batches = -(-config.data.num_val // config.eval_batch_size)
    assert (capped["solver_max_iter"], capped["solver_iterations"]) == (1, 1.0)
    assert capped["solver_nonconverged_batches"] == batches
    assert "| run (step 4) | 8 | 64 | 1: " in diag.budgets_markdown([budgets])


def test_diagnose_refuses_a_run_of_another_kind(tmp_path):
    import pytest

    from experiments.configs import equilibrium as eq_configs

    (tmp_path / "config.json").write_text(eq_configs.get_config("mazes_smoke").to_json())
    with pytest.raises(ValueError, match="not a prefix-sum net trained to equilibrium"):
        diag.diagnose(tmp_path)
