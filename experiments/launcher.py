"""What a launcher does before any work: restart on huge pages unless `--nohugepages`.

XLA:CPU runs faster with glibc's malloc on transparent huge pages
(`rvm.train.hugepages`); glibc reads that setting only when a process starts.
Importing this module defines the `--hugepages` flag.
"""

from absl import flags

from rvm.train import hugepages

HUGEPAGES = flags.DEFINE_bool(
    "hugepages", True, "Restart with glibc.malloc.hugetlb=1 first (Linux; faster on the CPU)."
)


def start() -> None:
    """Restarts the process on huge pages (see `rvm.train.hugepages.reexec`) if the flag says so."""
    if HUGEPAGES.value:
        hugepages.reexec()
