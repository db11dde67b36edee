"""Prefix sums of bit strings: the easy-to-hard sequence task, generated offline.

An example is a random bit string x of length L; its label is the running parity
y_i = (x_0 + ... + x_i) mod 2 at every position. Bits and labels are uint8 [N, L].
Strings of one length for training and longer ones for testing measure whether a
recurrent network extrapolates by iterating more: position i depends on all i + 1
bits before it, so a convolutional network needs a receptive field of L - 1.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rvm.data.mazes import split_seed


@dataclasses.dataclass(frozen=True)
class PrefixSums:
    bits: np.ndarray  # [N, L] uint8
    labels: np.ndarray  # [N, L] uint8: the running sum mod 2

    @property
    def size(self) -> int:
        """Bits per string."""
        return self.bits.shape[1]


def check_length(length, field: str = "length") -> int:
    """`length` as a positive int, or a ValueError naming `field`."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"{field}={length!r} must be a positive integer number of bits")
    return int(length)


def make_prefix_sums(seed: int, num: int, length: int) -> PrefixSums:
    """`num` random strings of `length` bits and their running parities."""
    length = check_length(length)
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num={num!r} must be a positive integer")
    bits = np.random.default_rng(seed).integers(0, 2, (num, length), dtype=np.uint8)
    labels = (np.cumsum(bits, axis=1) % 2).astype(np.uint8)
    return PrefixSums(bits, labels)


def prefix_sum_split(seed: int, length: int, split: str, num: int, stream: int = 0) -> PrefixSums:
    """The fixed `split` ("train", "val" or "test"; `rvm.data.mazes.split_seed`) of
    `length`-bit strings under the dataset seed."""
    return make_prefix_sums(split_seed(seed, check_length(length), split, stream), num, length)
