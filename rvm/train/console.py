"""What a run prints on the console: rvm's own short lines, a live progress line, and
the libraries' messages only when they warn.

orbax logs a hundred INFO lines per checkpoint through absl, the same logger as rvm's
own messages, so the libraries cannot be quietened by logger: `install` puts a handler
on the root logger that passes INFO from rvm's and the launchers' files only, in plain
form, and everything from WARNING up. A transient status line (the progress bar) is
redrawn in place on an interactive terminal and written as a plain line elsewhere.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

from absl import logging as absl_logging

# rvm's and the launchers' packages sit side by side (a checkout, or site-packages).
_ROOT = Path(__file__).resolve().parents[2]
_OURS = tuple(str(_ROOT / name) + "/" for name in ("rvm", "experiments"))
_CLEAR = "\r\x1b[K"


@functools.cache
def _ours(pathname: str) -> bool:
    return os.path.realpath(pathname).startswith(_OURS)  # a checkout behind a symlink too


class _Handler(logging.Handler):
    """rvm's lines as plain text, the libraries' below WARNING dropped; a shown status line
    is cleared before a message and drawn again after it."""

    def __init__(self) -> None:
        super().__init__()
        self.status = ""
        self.muted = False  # the libraries' warnings too (`mute_libraries`)

    def emit(self, record: logging.LogRecord) -> None:
        ours = _ours(record.pathname)
        if not ours and (record.levelno < logging.WARNING or self.muted):
            return
        try:
            text = record.getMessage()
            if record.levelno >= logging.WARNING:
                where = "" if ours else f" ({Path(record.pathname).name}:{record.lineno})"
                text = f"{record.levelname.lower()}{where}: {text}"
            stream = sys.stderr
            stream.write((_CLEAR if self.status else "") + text + "\n" + self.status)
            stream.flush()
        except Exception:  # logging must never take the run down
            self.handleError(record)


_handler: _Handler | None = None


def install(verbose: bool = False) -> None:
    """Routes logging through the quiet handler; `verbose` keeps absl's full log instead
    (the launchers' `--verbosity=1`)."""
    global _handler
    if verbose or _handler is not None:
        return
    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    _handler = _Handler()
    root.addHandler(_handler)
    root.setLevel(logging.INFO)
    # Libraries that check their level before formatting skip the work as well.
    for name in ("jax", "tensorflow", "tensorboardX"):
        logging.getLogger(name).setLevel(logging.WARNING)


def mute_libraries() -> None:
    """After the launcher's last line (an error, a stop): what the libraries still print as
    the process ends (the warnings and tracebacks of work a failed checkpoint abandoned,
    exceptions ignored in their threads and finalisers) is dropped, unless the full log was
    asked for (`install(verbose=True)`)."""
    if _handler is None:
        return
    _handler.muted = True
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None


def live() -> bool:
    """Whether status lines are redrawn in place (the quiet handler on a terminal)."""
    return _handler is not None and sys.stderr.isatty()


def status(text: str) -> None:
    """Shows `text` as the live status line on a terminal, else logs it as a line."""
    if not live():
        absl_logging.info("%s", text)
        return
    width = shutil.get_terminal_size().columns - 1
    _handler.status = text[:width]  # a wrapped line could not be redrawn in place
    sys.stderr.write(_CLEAR + _handler.status)
    sys.stderr.flush()


def clear_status() -> None:
    """Erases the live status line (its numbers live on in the lines that follow)."""
    if live() and _handler.status:
        _handler.status = ""
        sys.stderr.write(_CLEAR)
        sys.stderr.flush()


def bar(fraction: float, width: int = 12) -> str:
    filled = int(round(max(0.0, min(fraction, 1.0)) * width))
    return "[" + "#" * filled + "." * (width - filled) + f"] {100 * fraction:3.0f}%"


def duration(seconds: float) -> str:
    """`1:02:03`, `2:03`, or hours alone beyond a day."""
    if seconds >= 86400:
        return f"{seconds / 3600:.0f}h"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
