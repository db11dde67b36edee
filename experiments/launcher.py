"""What every launcher does around its work: restart on huge pages unless `--nohugepages`,
keep the console to rvm's own lines, and turn a user error into one line.

XLA:CPU runs faster with glibc's malloc on transparent huge pages
(`rvm.train.hugepages`); glibc reads that setting only when a process starts. The
libraries' INFO messages (orbax logs a hundred lines per checkpoint) are hidden unless
`--verbosity=1`. An error the user can fix (`rvm.errors.UserError`: a bad config value,
missing data, an unusable workdir) prints `error: <message>` and exits with status 2;
`--traceback` shows its traceback instead. After such a line, or a launcher's `stop`
line, nothing the libraries print as the process ends is shown (unless `--verbosity=1`).
Importing this module defines the flags.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from absl import flags, logging

from rvm.errors import USER_ERROR_EXIT_CODE, UserError
from rvm.train import console, hugepages, signals

HUGEPAGES = flags.DEFINE_bool(
    "hugepages", True, "Restart with glibc.malloc.hugetlb=1 first (Linux; faster on the CPU)."
)
TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the traceback of an error the user can fix, not just its message."
)


def start() -> None:
    """Restarts the process on huge pages (see `rvm.train.hugepages.reexec`) if the flag says
    so, then quietens the libraries unless `--verbosity` is 1 or more.

    A launcher that caught SIGTERM and SIGINT from its first line
    (`rvm.train.signals.catch_early`) has them held until here: one that arrived is
    recorded now (`signals.pending`), and the process is not restarted for a run that will
    not start; one that arrives during the restart waits for the restarted process."""
    if HUGEPAGES.value and not signals.held():
        hugepages.reexec()
    signals.release_early()
    console.install(verbose=logging.get_verbosity() >= logging.DEBUG)


def stop(message: str, code: int) -> None:
    """Ends the process with `message` as its one last line (a warning) and exit `code`."""
    console.clear_status()
    logging.warning("%s", message)
    console.mute_libraries()
    sys.exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Prints a `UserError` as `error: <message>` and exits with status 2 (unless
    `--traceback`); every other exception propagates with its traceback."""
    try:
        yield
    except UserError as e:
        if TRACEBACK.value:
            raise
        console.clear_status()
        message = " ".join(line.strip() for line in str(e).splitlines())  # one line, always
        print(f"error: {message}", file=sys.stderr, flush=True)
        console.mute_libraries()
        sys.exit(USER_ERROR_EXIT_CODE)
