"""Thinking longer: maze and prefix-sum data, the weight-tied recurrent CNN, the progressive
loss and its truncated gradient, memory of the iterations without gradient, evaluation of
every iteration count in one scan, halting, config checks, and the whole loop."""

import json
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import train

from experiments.configs import mazes as maze_configs
from experiments.configs import prefix_sums as prefix_configs
from rvm.analysis.thinking import evaluate_run, read_run, write_report
from rvm.data.mazes import make_mazes, maze_split
from rvm.data.prefix_sums import make_prefix_sums, prefix_sum_split
from rvm.models.thinking import ThinkingNet
from rvm.tasks.thinking import progressive
from rvm.tasks.thinking import task as thinking_task
from rvm.train.config_check import validate

# --- Data ---------------------------------------------------------------------------------


def test_maze_splits_are_deterministic_and_distinct():
    a, b = maze_split(0, 5, "train", 20), maze_split(0, 5, "train", 20)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    test = maze_split(0, 5, "test", 20)
    assert not np.array_equal(a.images, test.images)
    assert not np.array_equal(a.images, maze_split(1, 5, "train", 20).images)
    assert a.images.shape == (20, 11, 11, 3) and a.size == 5


def _open_neighbours(open_px, p):
    y, x = p
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        q = (y + dy, x + dx)
        if 0 <= q[0] < open_px.shape[0] and 0 <= q[1] < open_px.shape[1] and open_px[q]:
            yield q


def _bfs_distance(open_px, start, goal):
    dist = {start: 0}
    queue = deque([start])
    while queue:
        p = queue.popleft()
        for q in _open_neighbours(open_px, p):
            if q not in dist:
                dist[q] = dist[p] + 1
                queue.append(q)
    return dist.get(goal), len(dist)


@pytest.mark.parametrize("size", [3, 6, 9])
def test_maze_path_connects_start_to_goal_through_open_cells(size):
    mazes = make_mazes(7, 10, size)
    for image, label in zip(mazes.images, mazes.labels):
        open_px = image[..., 0].astype(bool)
        start = tuple(np.argwhere(image[..., 1])[0])
        goal = tuple(np.argwhere(image[..., 2])[0])
        path = {tuple(p) for p in np.argwhere(label)}
        assert start != goal and start in path and goal in path
        assert all(open_px[p] for p in path)
        # A simple chain: the ends have one path neighbour, every other pixel two.
        for p in path:
            near = sum(q in path for q in _open_neighbours(open_px, p))
            assert near == (1 if p in (start, goal) else 2)
        # ...and the shortest route through open pixels (unique in a tree) is this one.
        distance, reached = _bfs_distance(open_px, start, goal)
        assert distance == len(path) - 1
        # A spanning tree: every cell reached, n^2 cells and n^2 - 1 passages open.
        assert reached == open_px.sum() == 2 * size * size - 1


def test_mazes_are_fast_enough_for_tests():
    # 1,000 mazes of 9x9 are generated in well under a second; this only checks their count
    mazes = maze_split(0, 9, "train", 1000)
    assert mazes.images.shape == (1000, 19, 19, 3)
    assert len({m.tobytes() for m in mazes.images}) > 990


def test_prefix_sum_labels_and_determinism():
    sums = prefix_sum_split(0, 16, "train", 50)
    for bits, label in zip(sums.bits, sums.labels):
        running = 0
        for b, y in zip(bits, label):
            running ^= int(b)
            assert y == running
    np.testing.assert_array_equal(sums.bits, prefix_sum_split(0, 16, "train", 50).bits)
    assert not np.array_equal(sums.bits, prefix_sum_split(0, 16, "test", 50).bits)
    assert 0.4 < sums.bits.mean() < 0.6


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: make_mazes(0, 4, 2), "size=2"),
        (lambda: make_mazes(0, 4, 9.5), "size=9.5"),
        (lambda: make_prefix_sums(0, 4, 3.5), "length=3.5"),
        (lambda: make_prefix_sums(0, 0, 8), "num=0"),
        (lambda: ThinkingNet(4, dims=1).init(jax.random.key(0), jnp.zeros((1, 8, 1)), 0), "iter"),
    ],
)
def test_bad_data_and_iteration_counts_are_refused(make, field):
    with pytest.raises(ValueError, match=field):
        make()


# --- Model --------------------------------------------------------------------------------


@pytest.mark.parametrize("dims, recall, shape", [(2, True, (2, 11, 11, 3)), (1, False, (3, 20, 1))])
def test_shapes_and_weight_tying(dims, recall, shape):
    model = ThinkingNet(width=6, blocks=1, recall=recall, dims=dims)
    x = jax.random.bernoulli(jax.random.key(1), 0.5, shape).astype(jnp.float32)
    params = {
        t: model.init(jax.random.key(0), x, t)["params"] for t in (1, 4)
    }  # init at two counts: the same parameters
    assert jax.tree.structure(params[1]) == jax.tree.structure(params[4])
    for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[4])):
        np.testing.assert_array_equal(a, b)
    variables = {"params": params[1]}
    outs = {t: model.apply(variables, x, t) for t in (1, 2, 7)}
    for out in outs.values():
        assert out.shape == (*shape[:-1], 2)
    assert not np.allclose(outs[1], outs[7])  # the count matters...
    # ...and larger inputs run with the same parameters.
    bigger = jnp.zeros((1, *(2 * s for s in shape[1:-1]), shape[-1]))
    assert model.apply(variables, bigger, 3).shape == (*bigger.shape[:-1], 2)


@pytest.mark.parametrize("dims, shape", [(1, (1, 12, 1)), (2, (1, 7, 7, 3))])
@pytest.mark.parametrize("head_kernel, reach", [(1, 0), (3, 3)])
def test_a_pointwise_head_reads_each_answer_from_its_own_state(dims, shape, head_kernel, reach):
    """With head_kernel=1 a change of the state at one position moves that position's
    logits only; a 3-wide head (three convolutions) reaches 3 positions each way."""
    model = ThinkingNet(width=6, blocks=1, dims=dims, head_kernel=head_kernel)
    x = jax.random.bernoulli(jax.random.key(1), 0.5, shape).astype(jnp.float32)
    variables = model.init(jax.random.key(0), x, 1)
    h = jax.random.uniform(jax.random.key(2), (*shape[:-1], 6))
    middle = tuple(s // 2 for s in shape[1:-1])
    readout = lambda h: model.apply(variables, h, method=ThinkingNet.readout)
    changed = np.zeros(shape[1:-1], bool)
    for seed in range(8):  # several pushes, so a ReLU that blocks one does not hide the reach
        push = 3 * jax.random.normal(jax.random.key(10 + seed), (6,))
        moved = h.at[(0, *middle)].add(push)
        changed |= np.any(np.asarray(readout(moved) != readout(h)), axis=-1)[0]
    where = np.argwhere(changed)
    assert where.size and np.max(np.abs(where - np.array(middle))) == reach
    assert model.radius(4) == 1 + 4 * 3 + reach


def test_trajectory_emits_the_logits_of_every_count():
    model = ThinkingNet(width=6, blocks=1, dims=1)
    x = jax.random.bernoulli(jax.random.key(1), 0.5, (2, 12, 1)).astype(jnp.float32)
    variables = model.init(jax.random.key(0), x)
    emitted = model.apply(
        variables, x, 5, lambda a, logits: (a, logits), 0, method=ThinkingNet.trajectory
    )
    for t in range(5):
        np.testing.assert_allclose(emitted[t], model.apply(variables, x, t + 1), atol=1e-5)


# --- Progressive loss ---------------------------------------------------------------------


def _tiny():
    model = ThinkingNet(width=4, blocks=1, dims=1)
    x = jax.random.bernoulli(jax.random.key(1), 0.5, (2, 10, 1)).astype(jnp.float32)
    labels = (jnp.cumsum(x[..., 0], axis=1) % 2).astype(jnp.int32)
    return model, model.init(jax.random.key(0), x)["params"], x, labels


def test_truncated_gradient_flows_through_the_last_k_iterations_only():
    model, params, x, labels = _tiny()
    n, k = 3, 2
    loss = lambda p: progressive.per_position_loss(
        progressive.truncated_logits(model, p, x, n, k), labels
    )
    grads = jax.grad(loss)(params)

    # Reference: the state after n iterations is a constant, then k iterations with gradient.
    h0 = model.apply({"params": params}, x, method=ThinkingNet.encode)
    h_n = model.apply({"params": params}, h0, x, n, method=ThinkingNet.think)

    def from_constant(p):
        h = model.apply({"params": p}, h_n, x, k, method=ThinkingNet.think)
        logits = model.apply({"params": p}, h, method=ThinkingNet.readout)
        return progressive.per_position_loss(logits, labels)

    reference = jax.grad(from_constant)(params)
    full = jax.grad(
        lambda p: progressive.per_position_loss(model.apply({"params": p}, x, n + k), labels)
    )(params)
    # The two losses are one value; full backprop differs, so the comparison can fail.
    np.testing.assert_allclose(loss(params), from_constant(params), rtol=1e-6)
    assert not np.allclose(
        full["iteration"]["recall"]["kernel"], grads["iteration"]["recall"]["kernel"]
    )
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The embedding acts only before the k iterations: no gradient reaches it.
    assert not np.any(grads["embed"]["kernel"])
    assert np.any(full["embed"]["kernel"])


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_of_iterations_without_gradient_is_flat_in_their_number():
    model = ThinkingNet(width=16, blocks=1, dims=1)
    x = jnp.ones((8, 64, 1))
    labels = jnp.zeros((8, 64), jnp.int32)
    params = model.init(jax.random.key(0), x)["params"]

    def truncated(n):
        logits = lambda p: progressive.truncated_logits(model, p, x, n, 2)
        return jax.grad(lambda p: progressive.per_position_loss(logits(p), labels))

    def full(n):
        logits = lambda p: model.apply({"params": p}, x, n + 2)
        return jax.grad(lambda p: progressive.per_position_loss(logits(p), labels))

    few, many = 4, 64
    # Backprop through all iterations stores a state per iteration: the check can see growth.
    assert _temp_bytes(full(many), params) > 4 * _temp_bytes(full(few), params)
    assert _temp_bytes(truncated(many), params) <= 1.05 * _temp_bytes(truncated(few), params)


def test_sampled_counts_stay_in_range():
    train = prefix_configs.get_config().train
    keys = jax.random.split(jax.random.key(0), 200)
    uniform = np.asarray(jax.vmap(lambda k: progressive.sample_prefix(k, train))(keys))
    assert uniform.min() == 0 and uniform.max() == train.iterations - train.grad_iterations
    train.counts = "poisson"
    drawn = np.asarray(jax.vmap(lambda k: progressive.sample_prefix(k, train))(keys))
    assert drawn.min() >= 0 and drawn.max() <= progressive.MAX_FACTOR * train.iterations
    assert len(set(drawn.tolist())) > 5
    # the count r = n + k has mean about m (the log-normal rate's mean)
    assert abs(np.mean(drawn + train.grad_iterations) - train.iterations) < 3


# --- Evaluation ---------------------------------------------------------------------------


def test_halting_index():
    same = jnp.array(
        [[False, False, False], [True, False, False], [True, True, False], [True, False, False]]
    )
    np.testing.assert_array_equal(thinking_task.halting_index(same, 1), [1, 2, 3])
    np.testing.assert_array_equal(thinking_task.halting_index(same, 2), [2, 3, 3])


def test_accuracy_curve_matches_the_model_at_each_count():
    """Labels are the tiny model's own predictions at counts 1-4 (one bit flipped in some
    examples, which no count solves), so every field is checked against values that
    differ from count to count; 10 examples in batches of 4 (the last one padded)."""
    model = ThinkingNet(width=4, blocks=1, dims=1)
    x = jax.random.bernoulli(jax.random.key(3), 0.5, (10, 12, 1)).astype(jnp.float32)
    variables = model.init(jax.random.key(0), x)
    preds = np.stack([np.argmax(model.apply(variables, x, t), -1) for t in range(1, 6)])
    labels = preds[[0, 1, 2, 3, 4, 0, 1, 3, 2, 4], np.arange(10)]  # [B, L]: count 1-5's
    labels[[5, 9], 0] ^= 1
    split = thinking_task.Split(np.asarray(x, np.uint8), labels.astype(np.uint8))
    curve = thinking_task.accuracy_curve(model, variables, split, 5, batch_size=4)
    right = preds == labels  # [T, B, L]
    solved = np.all(right, axis=2)
    accuracy = 100.0 * solved.mean(1)
    assert len(set(accuracy)) > 2 and 0 < accuracy.max() < 100  # counts really differ
    np.testing.assert_allclose(curve["accuracy"], accuracy, rtol=1e-6)
    np.testing.assert_allclose(curve["position_accuracy"], 100.0 * right.mean((1, 2)), rtol=1e-6)
    assert curve["examples"] == len(x)
    assert curve["solved"] == solved.sum(1).tolist()
    # Halting (patience 1) from the same predictions, count by count.
    same = np.stack(
        [np.zeros(len(x), bool)] + [np.all(a == b, axis=1) for a, b in zip(preds[1:], preds)]
    )
    halt = np.asarray(thinking_task.halting_index(same, 1))
    assert len(set(halt)) > 1 and 0 < solved[halt, np.arange(len(x))].mean() < 1
    np.testing.assert_allclose(curve["halt_iterations"], np.mean(halt + 1), rtol=1e-6)
    assert curve["halt_solved"] == solved[halt, np.arange(len(x))].sum()
    np.testing.assert_allclose(
        curve["halt_accuracy"], 100.0 * solved[halt, np.arange(len(x))].mean(), rtol=1e-6
    )
    np.testing.assert_allclose(curve["halt_saved_iterations"], 5 - np.mean(halt + 1), rtol=1e-6)


# --- Configs and the whole loop -------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("data.train_size", 2, "data.train_size=2"),
        ("data.test_sizes", (9, 1), r"data.test_sizes\[1\]=1"),
        ("train.iterations", 0, "train.iterations=0"),
        ("train.grad_iterations", 11, "train.grad_iterations=11"),
        ("train.progressive_weight", 1.5, "train.progressive_weight=1.5"),
        ("train.counts", "normal", "train.counts='normal'"),
        ("data.kind", "sudoku", "data.kind='sudoku'"),
    ],
)
def test_bad_configs_are_refused_before_compiling(tmp_path, field, value, message):
    config = maze_configs.get_config("smoke")
    config.train.iterations = 10
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        train(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_sizes_the_receptive_field_cannot_cover_warn():
    config = prefix_configs.get_config("smoke")
    config.data.test_sizes = (8, 500)
    with pytest.warns(UserWarning, match="data size 500"):
        validate(config)


@pytest.mark.parametrize("configs", [prefix_configs, maze_configs], ids=["prefix", "mazes"])
def test_smoke_run_through_the_loop(configs, tmp_path):
    config = configs.get_config("smoke")
    results = train(config, tmp_path)
    assert results["finished"]
    saved = json.loads((tmp_path / "results.json").read_text())
    most = config.eval.factor * config.train.iterations
    assert set(saved["sizes"]) == {str(s) for s in config.data.test_sizes}
    for curve in saved["sizes"].values():
        assert len(curve["accuracy"]) == most
        np.testing.assert_allclose(
            curve["halt_saved_iterations"], most - curve["halt_iterations"], rtol=1e-6
        )
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == config.num_epochs
    assert "val_error" in json.loads(lines[-1])  # the test split is read at the end only
    # Evaluating the final checkpoint again gives the curves of results.json.
    again = evaluate_run(tmp_path)["results"]["sizes"]
    for size, curve in saved["sizes"].items():
        assert again[size]["accuracy"] == curve["accuracy"]
        # exact match is often 0 at every count after a smoke run: the positions tell more
        # (summed in float32 over 8 devices in the loop, over one here: rounding apart)
        np.testing.assert_allclose(
            again[size]["position_accuracy"], curve["position_accuracy"], rtol=1e-5
        )
        assert len(set(curve["position_accuracy"])) > 1
    # ...and other sizes can be evaluated from it (beside the trained size, the reference);
    # a size below the minimum is refused.
    kind, larger = config.data.kind, [2 * s for s in config.data.test_sizes]
    evaluated = evaluate_run(tmp_path, {kind: larger})["results"]["sizes"]
    assert set(evaluated) == set(map(str, [config.data.train_size, *larger]))
    with pytest.raises(ValueError, match=r"data.test_sizes\[0\]=0"):
        evaluate_run(tmp_path, {kind: [0]})
    # The report reads the records alone; a run without results.json is listed as unfinished.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (unfinished / name).write_text((tmp_path / name).read_text())
    runs = [read_run(tmp_path), read_run(unfinished)]
    summary = write_report(runs, tmp_path / "report", "this CPU", "pytest")
    assert "unfinished: " in summary.read_text() and "UNFINISHED at step" in summary.read_text()
    rows = [
        line for line in summary.read_text().splitlines() if line.startswith(f"| {tmp_path.name} |")
    ]
    assert len(rows) == len(config.data.test_sizes)
    assert (tmp_path / "report" / "thinking_longer.png").stat().st_size > 0
