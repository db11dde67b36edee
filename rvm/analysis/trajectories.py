"""Representation trajectories within a level (section 4.4, Figures 4-5 of the paper).

Inside a level every block adds a residual to the same representation space, so
an example's representation after each block traces a path. For a fixed random set
of training examples we project the level's input and every block output (N+1
points per example) to 2-D with one PCA per level:
  unnormalised  PCA of the raw points;
  normalised    at each block index, the mean over the examples is subtracted
                first, removing the drift that every example shares.
`linear_separability` measures how well the level's last representation already
separates the classes with a linear model (the paper's remark on the post-net).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from rvm.analysis.readout import save_figure
from rvm.analysis.runs import LEVEL_NAMES, LoadedRun

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclasses.dataclass(frozen=True)
class LevelTrajectories:
    """2-D trajectories of one level: `raw`/`normalized` are [examples, N+1, 2]."""

    level: int
    labels: np.ndarray  # [examples]
    raw: np.ndarray
    normalized: np.ndarray
    explained_raw: np.ndarray  # variance ratio of the two components
    explained_normalized: np.ndarray


def sample_indices(num_available: int, num: int = 100, seed: int = 0) -> np.ndarray:
    """A fixed random subset (sorted) of `num` indices; the same seed gives the same set."""
    num = min(num, num_available)
    return np.sort(np.random.default_rng(seed).choice(num_available, num, replace=False))


def stack_level(inputs: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """(input [B,...], block outputs [N,B,...]) -> [B, N+1, D]: each point flattened."""
    b = inputs.shape[0]
    points = np.concatenate([inputs[None], outputs], axis=0)  # [N+1, B, ...]
    return np.moveaxis(points.reshape(points.shape[0], b, -1), 0, 1).astype(np.float32)


def pca_2d(points: np.ndarray, normalized: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[examples, T, D] -> ([examples, T, 2], explained variance ratio of the 2 components).

    Randomised SVD: the points are wide (up to 16k dimensions) and only the top
    two directions are needed, so a full decomposition would be wasted work; two
    power iterations suffice for a picture (the explained variance is exact).
    """
    if normalized:
        points = points - points.mean(axis=0, keepdims=True)
    n, t, d = points.shape
    pca = PCA(2, svd_solver="randomized", iterated_power=2, random_state=seed)
    with threadpool_limits(1):  # as in `cv_accuracy`: thin QRs, threads only contend
        flat = pca.fit_transform(points.reshape(n * t, d))
    return flat.reshape(n, t, 2), pca.explained_variance_ratio_


def trajectories(
    run: LoadedRun,
    *,
    num_examples: int = 100,
    seed: int = 0,
    consolidated: bool | None = None,
) -> list[LevelTrajectories]:
    """The three levels' PCA trajectories for `num_examples` fixed random training images."""
    images, labels = run.split("train")
    idx = sample_indices(len(labels), num_examples, seed)
    acts = run.activations(images[idx], consolidated=consolidated)
    result = []
    for level, (inputs, outputs) in enumerate(acts):
        points = stack_level(inputs, outputs)
        raw, ex_raw = pca_2d(points, normalized=False, seed=seed)
        norm, ex_norm = pca_2d(points, normalized=True, seed=seed)
        result.append(LevelTrajectories(level, labels[idx], raw, norm, ex_raw, ex_norm))
    return result


def cv_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> dict:
    """Stratified k-fold accuracy of L2-regularised logistic regression (C=1).

    Features are standardised over all the chosen examples (label-free). The fit
    then runs on the eigen-features of the n x n Gram matrix instead of the D-wide
    features: an L2-regularised linear model only sees inner products, which these
    reproduce exactly, so the accuracy is the same while each fit costs n^2, not n*D.
    """
    # One BLAS thread: on a busy machine multithreaded BLAS spends more time waiting
    # for its threads than computing on matrices this small (10x slower measured).
    with threadpool_limits(1):
        x = features.reshape(len(features), -1).astype(np.float64)
        std = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
        eigval, eigvec = np.linalg.eigh(x @ x.T)
        keep = eigval > 1e-9 * max(eigval.max(), 1e-30)
        z = eigvec[:, keep] * np.sqrt(eigval[keep])
        # Stratification puts every class in every fold, so a class needs two or more
        # examples (rarer ones are left out) and the fold count is capped by the rarest.
        counts = np.bincount(labels)
        kept = counts[labels] >= 2
        z, labels = z[kept], labels[kept]
        counts = np.bincount(labels)
        folds = max(2, min(folds, int(counts[counts > 0].min())))
        accs = []
        split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(z, labels)
        for train, test in split:
            clf = LogisticRegression(C=1.0, max_iter=2000).fit(z[train], labels[train])
            accs.append(float(np.mean(clf.predict(z[test]) == labels[test])))
    return {
        "accuracy": float(np.mean(accs)),
        "sd": float(np.std(accs, ddof=1)),
        "folds": folds,
        "chance": float(counts.max() / len(labels)),
        "left_out": int((~kept).sum()),
    }


def linear_separability(
    run: LoadedRun,
    *,
    num_examples: int = 1000,
    folds: int = 5,
    seed: int = 0,
    consolidated: bool | None = None,
) -> list[dict]:
    """Per level, cross-validated linear accuracy (%) of the level's last representation.

    Uses `num_examples` fixed random training images (drawn with their own seed,
    independently of the trajectory set, which they may overlap) and `cv_accuracy`;
    cheap: one forward pass and a few small logistic regressions.
    """
    images, labels = run.split("train")
    idx = sample_indices(len(labels), num_examples, seed + 1)
    ends = run.level_ends(images[idx], consolidated=consolidated)
    records = []
    for level, end in enumerate(ends):
        scores = cv_accuracy(end, labels[idx], folds, seed)
        records.append(
            {
                "level": level,
                "name": LEVEL_NAMES[level],
                "examples": len(idx),
                "features": int(np.prod(end.shape[1:])),
                "accuracy": 100.0 * scores["accuracy"],
                "sd": 100.0 * scores["sd"],
                "folds": scores["folds"],
                "chance": 100.0 * scores["chance"],
                "left_out": scores["left_out"],  # examples of classes too rare to stratify
            }
        )
    return records


def plot_trajectories(
    levels: Sequence[LevelTrajectories],
    path: str | Path,
    *,
    title: str = "",
    class_names: Sequence[str] | None = None,
    separability: Sequence[dict] | None = None,
) -> Path:
    """Figures 4-5: levels as columns; unnormalised (top) and normalised (bottom) rows.

    Dots are coloured by class; arrows join consecutive blocks of one example; the
    level input is drawn as a cross and the level's end as a larger dot.
    """
    fig = Figure(figsize=(5 * len(levels), 9.5))
    axes = np.asarray(fig.subplots(2, len(levels), squeeze=False))
    cmap = colormaps["tab10"]
    for col, lt in enumerate(levels):
        colours = cmap(lt.labels % 10)
        for row, (pts, explained) in enumerate(
            [(lt.raw, lt.explained_raw), (lt.normalized, lt.explained_normalized)]
        ):
            ax = axes[row, col]
            n, t, _ = pts.shape
            start, delta = pts[:, :-1].reshape(-1, 2), np.diff(pts, axis=1).reshape(-1, 2)
            ax.quiver(
                start[:, 0],
                start[:, 1],
                delta[:, 0],
                delta[:, 1],
                color=np.repeat(colours, t - 1, axis=0),
                angles="xy",
                scale_units="xy",
                scale=1,
                width=0.0025,
                alpha=0.5,
            )
            ax.scatter(*pts.reshape(-1, 2).T, s=4, c=np.repeat(colours, t, axis=0), lw=0)
            ax.scatter(*pts[:, 0].T, s=14, c=colours, marker="x", lw=0.8)
            ax.scatter(*pts[:, -1].T, s=22, c=colours, edgecolors="k", lw=0.3)
            kind = "normalised" if row else "unnormalised"
            name = f"{LEVEL_NAMES[lt.level]} level, {t - 1} blocks"
            ax.set_title(f"{name}, {kind}\nPCA variance {100 * explained.sum():.0f}%", fontsize=9)
            ax.tick_params(labelsize=7)
            if separability is not None and row == 0:
                s = separability[col]
                ax.set_xlabel(
                    f"linear accuracy at level end {s['accuracy']:.1f}% "
                    f"({s['folds']}-fold CV, {s['examples']} images)",
                    fontsize=8,
                )
    present = sorted(set(levels[0].labels.tolist()))
    names = class_names or [f"class {c}" for c in range(10)]
    handles = [
        axes[0, 0].scatter([], [], color=cmap(c % 10), s=12, label=names[c]) for c in present
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(10, len(handles)), fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, rect=(0, 0.04, 1, 0.97))
