"""Errors that the user, not the code, can fix: a bad config value, missing data, an
unusable workdir, a checkpoint that cannot be written.

Their messages name the problem and the fix in one line, so the launchers print
`error: <message>` and exit with status 2 instead of a traceback; any other exception
is a bug and keeps its traceback. Each type also derives from the builtin that code
raised before (ValueError, OSError, ...), so callers catching those still catch them.
"""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2  # what argument parsers exit with on a bad command line


class UserError(Exception):
    """An error the user can fix; its message says what and how, in one line."""


class ConfigError(UserError, ValueError):
    """A config value is not allowed, or does not fit the data or the devices."""


class DataError(UserError, ValueError):
    """A data file or source is malformed."""


class WorkdirError(UserError, OSError):
    """The workdir cannot be created or written, or has no room."""
