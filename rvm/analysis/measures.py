"""Measures of the where-to-look tasks: error intervals and tracking scores (OTB conventions).

Tracking scores are over the frames after the first (whose box is given), per
frame and then averaged over all frames of all tracks:
* mean IoU; success rate = share of frames with IoU > 0.5; failure rate = IoU < 0.1;
* success-plot AUC: the mean, over the thresholds 0, 0.05, ..., 1, of the share of
  frames whose IoU exceeds the threshold (OTB-2013);
* recovery: of the occlusions (a run of frames where the target is hidden, ending
  before the track does), the share after which IoU > 0.5 is reached within
  `window` frames of the target reappearing.

Their 95% intervals resample whole tracks (a percentile bootstrap): the frames of one
track are not independent draws, the tracks are.
"""

from __future__ import annotations

import math

import numpy as np

THRESHOLDS = np.linspace(0.0, 1.0, 21)


def wilson(errors: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95% interval (in %) of a rate of `errors` out of `n`."""
    if n == 0:
        return (0.0, 100.0)
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


def occlusion_ends(visible: np.ndarray) -> list[tuple[int, int]]:
    """(track, first visible frame) after each hidden run of `visible` [N, T] that ends
    inside the track (a run still going at the last frame has no reappearance)."""
    ends = []
    for n, row in enumerate(np.asarray(visible, bool)):
        for t in range(1, len(row)):
            if row[t] and not row[t - 1]:
                ends.append((n, t))
    return ends


def recovery(ious: np.ndarray, visible: np.ndarray, window: int = 5) -> tuple[float | None, int]:
    """(share of occlusions recovered, number of occlusions): IoU > 0.5 at some frame of
    the `window` frames from the target's reappearance on; None without occlusions."""
    ends = occlusion_ends(visible)
    if not ends:
        return None, 0
    hit = [np.any(ious[n, t : t + window] > 0.5) for n, t in ends]
    return float(np.mean(hit)), len(ends)


def tracking_scores(ious: np.ndarray, visible: np.ndarray, window: int = 5) -> dict:
    """The module docstring's scores from per-frame IoU [N, T] and visibility [N, T]
    (frame 0, whose box is given, is left out)."""
    after = np.asarray(ious, np.float64)[:, 1:]
    success = [float(np.mean(after > t)) for t in THRESHOLDS]
    recovered, occlusions = recovery(ious, visible, window)
    hidden = ~np.asarray(visible, bool)[:, 1:]
    return {
        "mean_iou": float(np.mean(after)),
        "success_rate": float(np.mean(after > 0.5)),
        "failure_rate": float(np.mean(after < 0.1)),
        "auc": float(np.mean(success)),
        "recovery": recovered,
        "occlusions": occlusions,
        # how often the tracker has lost the target while or just after it is hidden
        "failure_rate_occluded": float(np.mean(after[hidden] < 0.1)) if hidden.any() else None,
        "frames": int(after.size),
        "intervals": track_intervals(ious, visible, window),
    }


def track_intervals(
    ious: np.ndarray, visible: np.ndarray, window: int = 5, draws: int = 2000, seed: int = 0
) -> dict[str, list[float] | None]:
    """95% percentile-bootstrap intervals of mean IoU, success, failure and recovery,
    drawing `draws` resamples of the tracks (rows of [N, T]) with replacement."""
    ious = np.asarray(ious, np.float64)
    after = ious[:, 1:]
    per_track = {  # each track's sum; all tracks have the same number of frames
        "mean_iou": after.sum(1),
        "success_rate": (after > 0.5).sum(1),
        "failure_rate": (after < 0.1).sum(1),
    }
    hits, counts = np.zeros(len(after)), np.zeros(len(after))
    for n, t in occlusion_ends(visible):
        counts[n] += 1
        hits[n] += np.any(ious[n, t : t + window] > 0.5)
    picks = np.random.default_rng(seed).integers(0, len(after), (draws, len(after)))
    bounds = lambda v: [float(x) for x in np.percentile(v, [2.5, 97.5])]
    out: dict[str, list[float] | None] = {
        name: bounds(sums[picks].sum(1) / after.size) for name, sums in per_track.items()
    }
    drawn = counts[picks].sum(1)
    out["recovery"] = bounds(hits[picks].sum(1) / np.maximum(drawn, 1)) if counts.any() else None
    return out
