"""Video-object systems: dual at K = 1 is the big network, predictive-corrective sums
reproduce a linear per-frame network, FLOP accounting, schedules, config errors, and a
pack of seeds through the loop, stopped and resumed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_pack_resumes_to_each_seed_alone, set_field

from experiments.configs import video_objects as configs
from rvm.analysis import video_objects as measures
from rvm.errors import ConfigError
from rvm.models import video_objects as vo
from rvm.models.conv import SameConv
from rvm.train.config_check import validate

TINY = dict(widths=(2, 4, 4), blocks=(1, 2, 2), small_features=2)


def _video(seed=0, frames=4, size=16):
    rng = np.random.default_rng(seed)
    x = rng.random((2, frames, size, size, 1)).astype(np.float32)
    m0 = np.zeros_like(x)
    m0[:, 0, 4:10, 4:10] = 1.0
    return jnp.asarray(np.concatenate([x, m0], -1))


def _perturb(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [v + 0.5 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def dual_pair():
    video = _video()
    model1 = vo.VideoObjects("dual", key_every=1, **TINY)
    model2 = vo.VideoObjects("dual", key_every=2, **TINY)
    variables = jax.jit(model2.init)(jax.random.PRNGKey(0), video)
    return video, model1, model2, variables


def test_dual_with_k1_uses_only_the_big_network(dual_pair):
    video, model1, model2, variables = dual_pair
    params = dict(variables["params"])
    noisy = {
        **variables,
        "params": {**params, "small": _perturb(params["small"], jax.random.PRNGKey(1))},
    }
    # with K = 2 the small network makes every other mask: perturbing it changes them
    apply2, apply1 = jax.jit(model2.apply), jax.jit(model1.apply)
    assert not np.allclose(apply2(variables, video), apply2(noisy, video), atol=1e-3)
    out, out_noisy = apply1(variables, video), apply1(noisy, video)
    np.testing.assert_array_equal(out, out_noisy)
    # and the masks are the per-frame big network's (the frame system with these weights)
    frame = vo.VideoObjects("frame", **TINY)
    big_only = {"params": {"big": params["big"]}, "batch_stats": variables["batch_stats"]}
    np.testing.assert_allclose(out, jax.jit(frame.apply)(big_only, video), atol=1e-5)


def _big(model, *args):
    return model.big(*args)


def test_propagate_feeds_each_frame_the_mask_it_predicted_for_the_one_before():
    video = _video(frames=4)
    model = vo.VideoObjects("propagate", **TINY)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), video)
    got = jax.jit(model.apply)(variables, video)
    x0, m0 = video[:, 0, ..., :1], video[:, 0, ..., 1:]
    big = jax.jit(lambda v, x, prev: model.apply(v, x, x0, m0, False, prev, method=_big))

    def frame_by_frame(fed):
        prev, out = m0, []
        for t in range(video.shape[1]):
            logits, _ = big(variables, video[:, t, ..., :1], prev)
            out.append(logits)
            prev = fed(logits)
        return jnp.stack(out, 1)

    own = frame_by_frame(lambda logits: jax.nn.sigmoid(logits)[..., None])
    np.testing.assert_allclose(got, own, atol=1e-5)
    # fed frame 0's mask at every frame instead, the later frames differ: the feed matters
    still = frame_by_frame(lambda logits: m0)
    assert not np.allclose(got[:, 1:], still[:, 1:], atol=1e-3)
    # training carries the batch statistics through the frames, and updates them
    _, updated = jax.jit(lambda v, x: model.apply(v, x, True, mutable=["batch_stats"]))(
        variables, video
    )
    before, after = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updated)
    assert all(np.all(np.isfinite(a)) for a in after)
    assert any(not np.allclose(a, b) for a, b in zip(after, before))
    config = configs.get_config("propagate")
    config.model.match = True
    with pytest.raises(ConfigError, match="not built for model.system='propagate'"):
        validate(config)


def test_prototypes_and_similarity_of_a_known_target():
    fg, bg = np.array([1.0, 0.0, 1.0]), np.array([0.0, 2.0, 0.0])
    mask = np.zeros((1, 8, 8, 1), np.float32)
    mask[0, :4] = 1.0  # the top half, which is the top half of the 4x4 features too
    feats = np.where(np.arange(4)[None, :, None, None] < 2, fg, bg) * np.ones((1, 4, 4, 3))
    protos = vo.prototypes(jnp.asarray(feats, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(protos[0], [fg, bg], atol=1e-5)
    sim = np.asarray(vo.similarity(jnp.asarray(feats, jnp.float32), protos))
    np.testing.assert_allclose(sim[0, :2], np.broadcast_to([1.0, 0.0], (2, 4, 2)), atol=1e-5)
    np.testing.assert_allclose(sim[0, 2:], np.broadcast_to([0.0, 1.0], (2, 4, 2)), atol=1e-5)


@pytest.mark.parametrize("system", ["frame", "dual"])
def test_matching_heads_compare_each_frame_with_frame_0s_target(system):
    """Every frame's head sees its features' similarity to frame 0's prototypes (not its
    own frame's), and dual at K = 1 is still the per-frame network."""
    video = _video()
    model = vo.VideoObjects(system, key_every=1, match=True, **TINY)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), video)
    out = jax.jit(model.apply)(variables, video)
    frame = vo.VideoObjects("frame", match=True, **TINY)
    big_only = {
        "params": {"big": variables["params"]["big"]},
        "batch_stats": variables["batch_stats"],
    }
    inputs = jnp.concatenate(
        [video[..., :1], jnp.broadcast_to(video[:, :1], video.shape)], -1
    )  # [frame, frame 0, mask 0]

    def by_hand(m):
        feats = vo.fold(lambda v: m.big.trunk(v, False), inputs)
        protos = vo.prototypes(feats[:, 0], inputs[:, 0, ..., 2:])
        one = lambda t: m.big.logits(feats[:, t], inputs[:, t, ..., :1], protos)
        own = lambda t: m.big.logits(
            feats[:, t], inputs[:, t, ..., :1], vo.prototypes(feats[:, t], inputs[:, 0, ..., 2:])
        )
        return jnp.stack([one(t) for t in range(4)], 1), jnp.stack([own(t) for t in range(4)], 1)

    want, own = frame.apply(big_only, method=by_hand)
    np.testing.assert_allclose(out, want, atol=1e-5)
    assert not np.allclose(out[:, 1:], own[:, 1:], atol=1e-3)  # frame 0's, not its own
    np.testing.assert_allclose(out[:, 0], own[:, 0], atol=1e-5)
    kernel = variables["params"]["big"]["head"]["project"]["kernel"]
    assert kernel.shape[-2] == TINY["widths"][-1] + 2  # the two similarity channels


def test_linear_predictive_corrective_sums_reproduce_the_per_frame_output():
    x = _video(frames=7)[..., :1]
    conv = SameConv(3, (3, 3), use_bias=False)
    params = conv.init(jax.random.PRNGKey(0), x[:, 0])
    f = lambda v: vo.fold(lambda a: conv.apply(params, a), v)
    kind, ref = vo.pc_schedule(x, every=100)  # no thresholds: one re-initialisation
    np.testing.assert_array_equal(kind[:, 0], vo.REINIT)
    assert (kind[:, 1:] == vo.UPDATE).all()
    corrections = f(x - vo.take_frames(x, ref))
    per_frame = f(x)
    assert not np.allclose(corrections[:, 1:], per_frame[:, 1:], atol=1e-2)
    summed = vo.predictive_corrective(per_frame, corrections, kind)
    np.testing.assert_allclose(summed, per_frame, atol=1e-5)


@pytest.mark.parametrize("pc_layers", [(3,), (2, 3)])
def test_pc_update_net_starts_as_a_copy_of_the_init_net(pc_layers):
    model = vo.VideoObjects("pc", pc_layers=pc_layers, **TINY)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), _video())
    for col in ("params", "batch_stats"):
        update, init = variables[col]["update_trunk"], variables[col]["big"]["trunk"]
        assert set(update) == set(init)  # every segment is covered by some block
        jax.tree.map(np.testing.assert_array_equal, update, init)
    # a copy, not a shared reference: the update net has its own parameters to train
    assert jax.tree.leaves(variables["params"]["update_trunk"])


def test_dual_small_network_costs_at_most_a_tenth_of_the_big_one():
    config = configs.get_config("dual")
    m, size = config.model, config.data.canvas
    x = jnp.zeros((1, size, size, 1))
    big = vo.BigNet(tuple(m.widths), tuple(m.blocks))
    shapes = jax.eval_shape(lambda: big.init(jax.random.PRNGKey(0), x, x, x, False))
    big_flops = measures.compiled_flops(lambda v, x: big.apply(v, x, x, x, False), shapes, x)
    step = vo.SmallStep(m.small_features)
    state = jnp.zeros((1, size // 4, size // 4, m.small_features))
    shapes = jax.eval_shape(lambda: step.init(jax.random.PRNGKey(0), (state, x[..., 0]), x))
    small_flops = measures.compiled_flops(
        lambda p, mask, x: step.apply(p, (state, mask), x), shapes, x[..., 0], x
    )
    assert small_flops <= 0.1 * big_flops, small_flops / big_flops


def test_pc_schedule_reinitialises_every_k_and_ignores_still_frames():
    x = np.zeros((1, 6, 4, 4, 1), np.float32)
    x[0, 1] = 0.5  # a large change
    x[0, 2] = 0.5  # no change
    x[0, 3:] = 0.51  # a small change that stays below the ignore threshold
    kind, ref = vo.pc_schedule(jnp.asarray(x), every=4, ignore_threshold=0.05)
    np.testing.assert_array_equal(kind[0], [0, 1, 2, 2, 0, 2])
    np.testing.assert_array_equal(ref[0], [0, 0, 1, 1, 1, 4])
    kind, _ = vo.pc_schedule(jnp.asarray(x), every=10, reinit_threshold=0.3)
    np.testing.assert_array_equal(kind[0], [0, 0, 1, 1, 1, 1])


def test_flop_accounting_of_a_tiny_network_matches_a_hand_count():
    x = jnp.zeros((1, 8, 8, 2))
    conv = SameConv(4, (3, 3), use_bias=False)
    params = conv.init(jax.random.PRNGKey(0), x)
    flops = measures.compiled_flops(lambda p, x: conv.apply(p, x), params, x)
    # XLA counts the multiply-adds that touch the image, not the zero padding: along
    # each axis of 8 pixels a 3-tap kernel has 3 * 8 - 2 taps inside; x2 channels in, x4 out
    assert flops == 2 * (3 * 8 - 2) ** 2 * 2 * 4
    two = SameConv(4, (3, 3), use_bias=False)
    flops2 = measures.compiled_flops(
        lambda p, x: two.apply(p, conv.apply(p, x)[..., :2]), params, x
    )
    assert flops2 == 2 * flops


def test_iou_and_j_summary():
    masks = np.zeros((1, 3, 4, 4), np.uint8)
    masks[0, :, :2, :2] = 1
    masks[0, 2] = 0  # target fully hidden: J = 1 if nothing is predicted
    logits = np.full((1, 3, 4, 4), -1.0)
    logits[0, 1, :2, :1] = 1.0  # half the mask
    iou = np.asarray(measures.mask_iou(jnp.asarray(logits), jnp.asarray(masks)))
    np.testing.assert_allclose(iou[0], [0.0, 0.5, 1.0])
    s = measures.summarize_j(iou, key_every=2)
    assert s["J"] == pytest.approx(75.0) and s["J_since_key"] == [100.0, 50.0]
    # videos 0 and 2 have a distractor of the target's class (3); video 1's are other digits
    ious = np.array([[1.0, 0.2, 0.4], [1.0, 0.9, 0.9], [1.0, 0.0, 0.2]])
    classes = np.array([[3, 5, 3, -1], [3, 5, -1, -1], [7, 7, -1, -1]])
    split = measures.j_by_distractor_class(ious, classes)
    assert split["J_same_class"] == pytest.approx(20.0)
    assert split["J_other_class"] == pytest.approx(90.0)
    assert (split["videos_same_class"], split["videos_other_class"]) == (2, 1)


def test_summary_takes_j_by_class_from_an_evaluation_that_agrees(tmp_path):
    import json

    results = {"step": 4, "val_J": 50.0, "test_J": 40.0, "test_J_se": 1.0, "test_J_decay": 5.0}
    results.update(test_J_per_frame=[40.0] * 3, flops_per_frame=2e6)
    (tmp_path / "frame").mkdir()
    (tmp_path / "frame/results.json").write_text(json.dumps(results))
    (tmp_path / "frame/config.json").write_text(configs.get_config("frame").to_json())
    test = {"J": 40.0, "J_same_class": 20.0, "J_other_class": 60.0}
    test.update(videos_same_class=5, videos_other_class=5)
    evaluated = {"step": 4, "validation": {"J": 50.0}, "test": test}
    (tmp_path / "frame/evaluated.json").write_text(json.dumps(evaluated))
    measures.write_summary(str(tmp_path), "a test VM")
    assert "| frame | 20.0 (5) | 60.0 (5) |" in (tmp_path / "summary.md").read_text()
    evaluated["test"]["J"] = 41.0  # another network's J: not this run's evaluation
    (tmp_path / "frame/evaluated.json").write_text(json.dumps(evaluated))
    with pytest.raises(ValueError, match="differs from results.json"):
        measures.write_summary(str(tmp_path), "a test VM")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("model.key_every", 0, "model.key_every=0 must be a positive integer"),
        ("model.ignore_threshold", -0.1, "model.ignore_threshold=-0.1 must be a non-negative"),
        ("model.reinit_threshold", -1.0, "model.reinit_threshold"),
        ("data.num_frames", 1, "num_frames must be >= 2"),
        ("data.distractors", (1, 4), "4 distractors and the target need 5 cells"),
        ("model.system", "tracker", "model.system='tracker' is not one of"),
        ("model.pc_layers", (3, 2), "model.pc_layers"),
        ("model.match", 1, "model.match=1 must be True or False"),
    ],
)
def test_bad_configs_fail_before_compiling(field, value, match):
    config = configs.get_config("dual")
    set_field(config, field, value)
    with pytest.raises(ConfigError, match=match) as err:
        validate(config)
    assert "\n" not in str(err.value)


def test_every_variant_validates():
    for variant in configs.variants():
        validate(configs.get_config(variant))


def test_a_pack_stopped_mid_epoch_resumes_to_each_seed_trained_alone(tmp_path):
    """Through the one loop, as for every task: seed by seed, as trained alone."""
    config = configs.get_config("smoke")  # dual, K = 3
    config.data.update(num_train=16, num_val=4, num_test=4, num_frames=4)
    config.update(num_epochs=2, measure_fps_batches=())  # 2 steps an epoch; frames/s is timing
    straight = assert_pack_resumes_to_each_seed_alone(config, tmp_path, stop_at=3)
    assert straight["step"] == 4
    assert straight["test_videos_same_class"] + straight["test_videos_other_class"] == 4

    # The final checkpoint evaluated again: the run's J, which the summary then trusts.
    evaluated = measures.evaluate_run(tmp_path / "alone")
    assert evaluated["step"] == 4
    assert evaluated["test"]["J"] == pytest.approx(straight["test_J"], abs=1e-9)
    assert evaluated["validation"]["J"] == pytest.approx(straight["val_J"], abs=1e-9)
    assert evaluated["test"]["J_same_class"] == straight["test_J_same_class"]
