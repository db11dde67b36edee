"""The published numbers of "Towards Efficient Recurrent Visual Models" (Tables 1-3).

They live in the library so that the report can set every run beside them without
reading a config file; the CIFAR-10 config family names its variants after them.
"""

from __future__ import annotations

import dataclasses

EPOCHS = 500  # the paper's training length, which its errors are reached with


@dataclasses.dataclass(frozen=True)
class Paper:
    """The paper's numbers and which configs each table covers."""

    test_error: dict  # (scope, depth) -> method -> error (%)
    tables: dict  # table number -> (scope, depth)
    depths: dict  # depth name -> blocks_per_level
    params: dict  # table number -> method -> parameter count


# Depth names of the tables: (18,18,18) is ResNet-110, (3,4,4) ResNet-24.
DEPTHS = {"18": (18, 18, 18), "3": (3, 4, 4)}

PAPER = Paper(
    test_error={  # single runs, horizontal flips only
        ("middle", "18"): {"nonshared": 6.67, "relaxed": 6.67, "raw": 7.78, "minimal": 7.23},
        ("all", "18"): {"nonshared": 6.67, "relaxed": 10.63, "raw": 12.04, "minimal": 11.18},
        ("all", "3"): {"nonshared": 8.26, "relaxed": 10.06, "raw": 10.29, "minimal": 11.25},
    },
    tables={1: ("middle", "18"), 2: ("all", "18"), 3: ("all", "3")},
    depths=DEPTHS,
    params={
        1: {"nonshared": 1732010, "relaxed": 1437098, "raw": 1437098, "minimal": 1434026},
        2: {"nonshared": 1732010, "relaxed": 179114, "raw": 179114, "minimal": 168266},
        3: {"nonshared": 363146, "relaxed": 169610, "raw": 169610, "minimal": 168266},
    },
)
