"""Mazes for "thinking longer": random spanning trees rendered as images, generated offline.

A maze of n x n cells is a spanning tree of the n x n grid graph, drawn by
Kruskal's algorithm over the grid's edges in a random order (a seeded numpy
Generator), so every pair of cells is joined by exactly one path.

Rendering, one pixel per cell and one per wall: the image is (2n+1) x (2n+1).
Cell (i, j) is pixel (2i+1, 2j+1); the pixel between two neighbouring cells is
open when the tree joins them; the border and every even-even pixel are wall.
Channels, uint8 0/1: 0 open (cells and passages), 1 the start cell, 2 the goal
cell. The label [H, W] marks the pixels of the unique shortest path from start to
goal, both ends and the passages between consecutive cells included.

Mazes with one pixel per wall keep the largest sizes (59 x 59 cells: 119 x 119
pixels) cheap enough for a CPU; a network iterates 3x3 convolutions, so it moves
information one pixel per convolution whatever the scale of the drawing.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

MIN_SIZE = 3
CHANNELS = ("open", "start", "goal")


@dataclasses.dataclass(frozen=True)
class Mazes:
    images: np.ndarray  # [N, 2n+1, 2n+1, 3] uint8: open, start, goal
    labels: np.ndarray  # [N, 2n+1, 2n+1] uint8: 1 on the path from start to goal

    @property
    def size(self) -> int:
        """Cells per side."""
        return (self.images.shape[1] - 1) // 2


def check_size(size, field: str = "size") -> int:
    """`size` as an int of at least MIN_SIZE cells, or a ValueError naming `field`."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"{field}={size!r} must be an integer number of cells >= {MIN_SIZE}")
    return int(size)


def _spanning_tree(rng: np.random.Generator, n: int) -> list[list[int]]:
    """Adjacency lists of a random spanning tree of the n x n grid (cells i * n + j)."""
    right = [(c, c + 1) for c in range(n * n) if c % n != n - 1]
    down = [(c, c + n) for c in range(n * (n - 1))]
    edges = right + down
    parent = list(range(n * n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]  # path halving keeps the trees flat
            a = parent[a]
        return a

    neighbours: list[list[int]] = [[] for _ in range(n * n)]
    joined = 0
    for e in rng.permutation(len(edges)).tolist():
        a, b = edges[e]
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[ra] = rb
            neighbours[a].append(b)
            neighbours[b].append(a)
            joined += 1
            if joined == n * n - 1:
                break
    return neighbours


def _path(neighbours: list[list[int]], start: int, goal: int) -> list[int]:
    """The cells from `start` to `goal` along the tree (breadth-first search)."""
    came_from = {start: start}
    queue = deque([start])
    while queue:
        c = queue.popleft()
        if c == goal:
            break
        for d in neighbours[c]:
            if d not in came_from:
                came_from[d] = c
                queue.append(d)
    path = [goal]
    while path[-1] != start:
        path.append(came_from[path[-1]])
    return path[::-1]


def _pixel(cell: int, n: int) -> tuple[int, int]:
    return 2 * (cell // n) + 1, 2 * (cell % n) + 1


def make_mazes(seed: int, num: int, size: int) -> Mazes:
    """`num` mazes of `size` x `size` cells, a pure function of (seed, num, size)."""
    n = check_size(size)
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num={num!r} must be a positive integer")
    rng = np.random.default_rng(seed)
    side = 2 * n + 1
    images = np.zeros((num, side, side, len(CHANNELS)), np.uint8)
    labels = np.zeros((num, side, side), np.uint8)
    for k in range(num):
        neighbours = _spanning_tree(rng, n)
        start, goal = (int(c) for c in rng.choice(n * n, 2, replace=False))
        for a, near in enumerate(neighbours):
            ya, xa = _pixel(a, n)
            images[k, ya, xa, 0] = 1
            for b in near:
                yb, xb = _pixel(b, n)
                images[k, (ya + yb) // 2, (xa + xb) // 2, 0] = 1
        images[(k, *_pixel(start, n), 1)] = 1
        images[(k, *_pixel(goal, n), 2)] = 1
        path = _path(neighbours, start, goal)
        for a, b in zip(path, path[1:]):
            (ya, xa), (yb, xb) = _pixel(a, n), _pixel(b, n)
            labels[k, ya, xa] = labels[k, (ya + yb) // 2, (xa + xb) // 2] = 1
        labels[(k, *_pixel(goal, n))] = 1
    return Mazes(images, labels)


# Each split's index in the seed; "val" is the split every choice is made on (the
# reported iteration count, tuning), so that "test" gives numbers nothing was chosen on.
SPLITS = {"train": 0, "test": 1, "val": 2}


def split_seed(seed: int, size: int, split: str, stream: int = 0) -> int:
    """The generator seed of one split ("train", "val" or "test") of one size: independent
    streams. `stream` > 0 draws other val and test splits of the same dataset seed: stream 0's
    test split is the one the first CPU results were tuned while looking at."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)) or stream < 0:
        raise ValueError(f"stream={stream!r} must be an integer >= 0")
    entropy = [seed, size, SPLITS[split]] + ([int(stream)] if stream else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def maze_split(seed: int, size: int, split: str, num: int, stream: int = 0) -> Mazes:
    """The fixed `split` of `size` x `size` mazes under the dataset seed `seed`."""
    return make_mazes(split_seed(seed, check_size(size), split, stream), num, size)
