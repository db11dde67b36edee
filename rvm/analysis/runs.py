"""A finished (or interrupted) run directory, read back for analysis without retraining.

`read_run_info` reads only the small JSON records (config, metrics, results, starts;
`rvm.analysis.records`), which is
all the tables and training curves need; `load_run` also restores a checkpoint and the
data, giving the networks the readout and trajectory analyses run. Everything comes
from the run directory alone, so a report can be rebuilt long after training ended.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from rvm.analysis.records import NotARunError, read_records
from rvm.data import ImageData, eval_batches, load_images, normalization_stats, normalize
from rvm.models import sharing
from rvm.models.recalibrate import recalibrate
from rvm.tasks import image as image_task
from rvm.train import loop, xla
from rvm.train import sharding as shd
from rvm.train.checkpoint import Checkpoints
from rvm.train.config_check import with_added_fields

LEVEL_NAMES = ("lower", "middle", "upper")
# A relaxed run's reported error, first found first: (results key, source).
RELAXED_ERRORS = (
    ("consolidated_recalibrated_test_error", "consolidated, recalibrated"),
    ("consolidated_test_error", "consolidated"),
)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """The JSON records of a run directory: enough for tables and training curves."""

    workdir: Path
    config: ml_collections.ConfigDict
    metrics: list[dict]
    results: dict | None  # None while the run is unfinished
    starts: list[dict] = dataclasses.field(default_factory=list)  # starts.jsonl, if written

    @property
    def name(self) -> str:
        return self.workdir.name

    @property
    def sharing(self) -> str:
        return self.config.model.sharing

    @property
    def scope(self) -> str:
        return self.config.model.scope

    @property
    def stochastic_depth(self) -> bool:
        return bool(self.config.model.stochastic_depth and self.config.model.final_death_rate > 0)

    @property
    def blocks_per_level(self) -> tuple[int, ...]:
        return tuple(self.config.model.blocks_per_level)

    @property
    def seed(self) -> int:
        return int(self.config.seed)

    @property
    def finished(self) -> bool:
        return bool(self.results and self.results.get("finished", False))

    @property
    def short_label(self) -> str:
        """Sharing mode and stochastic depth: what tells runs of one table apart in a plot."""
        return f"{self.sharing}, SD {'on' if self.stochastic_depth else 'off'}"

    @property
    def label(self) -> str:
        blocks = ",".join(str(b) for b in self.blocks_per_level)
        return f"{self.short_label}, {self.scope} ({blocks}), seed {self.seed}"

    def trained_by(self) -> str:
        """The commits and devices of the run's starts ("" for runs from before
        `starts.jsonl`): several commits mean parts of it ran different code."""
        if not self.starts:
            return ""
        commits = dict.fromkeys(s.get("commit") or "of unknown commit" for s in self.starts)
        devices = dict.fromkeys(
            f"{s['devices']['count']} x {s['devices']['kind']}" for s in self.starts
        )
        many = f" ({len(commits)} commits)" if len(commits) > 1 else ""
        return f"code {', '.join(commits)}{many} on {', '.join(devices)}"

    def scanned_blocks(self, level: int) -> int:
        """Non-padding blocks of a level in the trained network (levels 2-3 lose the padding)."""
        return sharing.trained_blocks(self.config.model)[level] - int(level > 0)

    def final_test_error(self) -> tuple[float | None, str]:
        """The error the tables report, and where it came from.

        Relaxed runs report the consolidated (raw-shared) network, as the paper
        counts their parameters after consolidation, with BatchNorm statistics
        re-estimated for it where known (the trained ones describe the unaveraged
        kernels' activations); unfinished runs fall back to
        the last epoch's test error of the trained network.
        """
        if self.results and self.results.get("finished"):
            for key, source in RELAXED_ERRORS:
                if self.sharing == "relaxed" and key in self.results:
                    return float(self.results[key]), source
            return float(self.results["test_error"]), "final"
        if self.metrics:
            last = self.metrics[-1]
            note = f"unfinished, epoch {last.get('epoch')} of {self.config.num_epochs}"
            if self.sharing == "relaxed":
                note += ", before consolidation"
            return float(last["test_error"]), note
        return None, "no epoch finished"

    def param_count(self) -> int:
        """Parameters of the network the run is evaluated as (consolidated for relaxed)."""
        if self.results and "params" in self.results:
            key = "params_consolidated" if self.sharing == "relaxed" else "params"
            return int(self.results.get(key, self.results["params"]))
        model = sharing.build_model(self.config.model, 10, consolidated=self.sharing == "relaxed")
        # 10 classes and 32x32 inputs: every run here is CIFAR-10 shaped, and only the
        # head depends on the class count (convolutions and pooling ignore image size).
        shapes = jax.eval_shape(
            lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
        )
        return sharing.count_params(shapes["params"])


def read_run_info(workdir: str | Path) -> RunInfo:
    """The records of an image run (`rvm.analysis.records`), its config with the fields
    added since it was saved filled in."""
    records = read_records(workdir)
    task = records.config.get("task", "image")
    if task != "image":
        raise NotARunError(
            f"{records.workdir} is a {task!r} run; these analyses read image runs "
            "(experiments/sequence_summary.py summarises moving-digits runs)"
        )
    config = ml_collections.ConfigDict(with_added_fields(records.config))
    return RunInfo(records.workdir, config, records.metrics, records.results, records.starts)


@xla.jit(static_argnames="model")
def _forward_activations(model: nn.Module, variables: dict, images, mean, std):
    x = normalize(images.astype(jnp.float32), mean, std)
    _, acts = model.apply(variables, x, train=False)
    return acts


@dataclasses.dataclass
class LoadedRun:
    """A run with its restored variables and data, ready for evaluation-time analyses.

    `model`/`variables` is the trained network. For relaxed runs
    `consolidated_model`/`consolidated_variables` is the raw-shared network it
    becomes; `network()` picks the one the run is evaluated as by default.
    """

    info: RunInfo
    step: int
    model: nn.Module
    variables: dict
    data: ImageData
    stats: tuple[Any, Any]
    mesh: Mesh
    consolidated_model: nn.Module | None = None
    consolidated_variables: dict | None = None

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.info.config

    @property
    def eval_batch_size(self) -> int:
        # Rounded up so every device gets an equal share of a batch, whatever the
        # device count at analysis time; evaluation pads the last batch anyway.
        n = self.mesh.devices.size
        return math.ceil(self.config.eval_batch_size / n) * n

    def consolidated(self, consolidated: bool | None) -> bool:
        """Resolves None to the network the run is evaluated as."""
        if consolidated is None:
            return self.consolidated_model is not None
        if consolidated and self.consolidated_model is None:
            raise ValueError(
                f"{self.info.workdir}: only relaxed runs have a consolidated network "
                f"(this run is {self.info.sharing})"
            )
        return consolidated

    def network(self, consolidated: bool | None = None) -> tuple[nn.Module, dict]:
        if self.consolidated(consolidated):
            return self.consolidated_model, self.consolidated_variables
        return self.model, self.variables

    def level_is_shared(self, level: int, consolidated: bool | None = None) -> bool:
        """Whether the level is raw-shared in the chosen network (can run past its depth)."""
        model, _ = self.network(consolidated)
        return bool(model.shared_levels[level])

    def level_is_equilibrium(self, level: int) -> bool:
        """Whether the level is one block solved to its fixed point (`model.sharing`
        "equilibrium"): its readout time is the solver's iteration count."""
        return bool(self.model.equilibrium_levels[level])

    def split(self, name: str = "test", num_examples: int | None = None):
        """(images, labels) of a split, optionally only its first `num_examples`."""
        images, labels = getattr(self.data, f"{name}_images"), getattr(self.data, f"{name}_labels")
        if images is None:
            raise ValueError(f"{self.info.workdir}: the data has no {name} split")
        if num_examples is not None:
            images, labels = images[:num_examples], labels[:num_examples]
        return images, labels

    def evaluate(
        self,
        masks: list | None = None,
        iterations: tuple[int | None, ...] | None = None,
        *,
        consolidated: bool | None = None,
        split: str = "test",
        num_examples: int | None = None,
        variables: dict | None = None,
    ) -> dict[str, float]:
        """Error (%) and loss of the chosen network on a split, with optional ablations;
        `variables` replaces the network's own (e.g. `recalibrated`'s)."""
        model, own = self.network(consolidated)
        variables = own if variables is None else variables
        images, labels = self.split(split, num_examples)
        return image_task.evaluate(
            model,
            variables,
            images,
            labels,
            self.stats,
            self.eval_batch_size,
            mesh=self.mesh,
            masks=masks,
            iterations=None if iterations is None else tuple(iterations),
        )

    def recalibrated(
        self,
        masks: list | None = None,
        iterations: tuple[int | None, ...] | None = None,
        *,
        consolidated: bool | None = None,
        num_images: int = image_task.RECALIBRATION_IMAGES,
    ) -> dict:
        """The chosen network's variables with BatchNorm statistics re-estimated for the
        given ablation (`rvm.models.recalibrate`) on `num_images` training images."""
        model, variables = self.network(consolidated)
        batches = image_task.recalibration_batches(
            self.data.train_images, self.stats, self.config.batch_size, num_images
        )
        return recalibrate(model, variables, batches, iterations=iterations, masks=masks)

    def _batched_activations(self, images_u8: np.ndarray, consolidated, batch_size: int):
        """Yields each batch's per-level (input, outputs) on host, padding rows dropped.

        Batches have one fixed (padded) size, so a call compiles the forward pass once.
        """
        model, variables = self.network(consolidated)
        model = model.clone(keep_activations=True)
        n_dev = self.mesh.devices.size
        batch_size = math.ceil(batch_size / n_dev) * n_dev
        labels = np.zeros(len(images_u8), np.int32)
        batch_sharding = shd.batch(self.mesh)
        for x, _, weight in eval_batches(images_u8, labels, batch_size):
            x = jax.device_put(x, batch_sharding)
            acts = jax.device_get(_forward_activations(model, variables, x, *self.stats))
            keep = int(weight.sum())
            yield [(inp[:keep], out[:, :keep]) for inp, out in acts]

    def activations(
        self, images_u8: np.ndarray, *, consolidated: bool | None = None, batch_size: int = 100
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per level (input [B,H,W,C], block outputs [N,B,H,W,C]) for uint8 images, on host."""
        parts = list(self._batched_activations(images_u8, consolidated, batch_size))
        return [
            (
                np.concatenate([p[lvl][0] for p in parts]),
                np.concatenate([p[lvl][1] for p in parts], axis=1),
            )
            for lvl in range(len(parts[0]))
        ]

    def level_ends(
        self, images_u8: np.ndarray, *, consolidated: bool | None = None, batch_size: int = 100
    ) -> list[np.ndarray]:
        """Per level, the representation after its last block [B,H,W,C], on host.

        Keeps only the ends of each batch, so many images fit in host memory.
        """
        parts = [
            [out[-1] for _, out in batch]
            for batch in self._batched_activations(images_u8, consolidated, batch_size)
        ]
        return [np.concatenate([p[lvl] for p in parts]) for lvl in range(len(parts[0]))]


def _abstract_state(config: ml_collections.ConfigDict, data: ImageData, mesh: Mesh) -> Any:
    """The train state's shapes (`loop.state_shapes`), with shardings on `mesh`.

    Replacing the shardings also lets a checkpoint saved on another topology restore here.
    """
    shapes = loop.state_shapes(config, data)
    replicated = shd.replicated(mesh)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes
    )


def require_checkpoint(workdir: Path) -> None:
    """Raises NotARunError unless `workdir/checkpoints` holds a step; checked before
    orbax sees the path, since its manager would create the directory."""
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise NotARunError(f"{workdir} has no checkpoint to analyse (looked in {ckpt_dir})")


def load_run(
    workdir: str | Path,
    step: int | None = None,
    *,
    data: ImageData | None = None,
    mesh: Mesh | None = None,
) -> LoadedRun:
    """Restores a run's checkpoint (the newest, or `step`) with its data and networks.

    `data` skips reloading when several runs share a dataset (it must be the one
    `config.data` names); `mesh` defaults to every local device.
    """
    info = read_run_info(workdir)
    workdir = info.workdir
    require_checkpoint(workdir)
    config = info.config
    data = load_images(config.data) if data is None else data
    mesh = shd.data_mesh() if mesh is None else mesh
    ckpts = Checkpoints(workdir, keep=max(int(config.keep_checkpoints), 1))
    steps = ckpts.all_steps()
    if step is not None and step not in steps:
        ckpts.close()
        raise NotARunError(f"{workdir} has no checkpoint of step {step}; it has steps {steps}")
    try:
        state = ckpts.restore(_abstract_state(config, data, mesh), step)
    finally:
        ckpts.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    model = sharing.build_model(config.model, data.num_classes)
    run = LoadedRun(
        info=info,
        step=int(state.step),
        model=model,
        variables=variables,
        data=data,
        stats=normalization_stats(data.train_images, config.data.normalization),
        mesh=mesh,
    )
    if config.model.sharing == "relaxed":
        run.consolidated_model = sharing.build_model(
            config.model, data.num_classes, consolidated=True
        )
        run.consolidated_variables = {
            **variables,
            "params": sharing.consolidate(state.params, config.model.scope),
        }
    return run
