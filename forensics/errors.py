"""The errors a user sees.

Every error the library raises on purpose derives from :class:`FpError`. The CLI prints
its message as ``Error: <message>`` on stderr and exits with status 1; a traceback is shown
only with ``fp --debug``. Messages say what went wrong *and* what to do about it.
"""

from __future__ import annotations

from typing import Any

#: Longest text shown in one table cell or line (the rest is cut, marked with "...").
SHOWN_MAX = 200


def printable(value: Any, limit: int = SHOWN_MAX) -> str:
    """``value`` as text safe for a terminal: control and format characters (escape
    sequences, newlines, BEL, bidirectional overrides) shown as Python escapes, and at
    most ``limit`` characters.

    Bank rows written by other tools, and file names, may hold such characters.
    """
    import unicodedata

    text = str(value)
    if any(unicodedata.category(c)[0] == "C" for c in text):
        text = "".join(repr(c)[1:-1] if unicodedata.category(c)[0] == "C" else c
                       for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FpError(Exception):
    """Base class of every error ``fp`` reports to a user."""

    exit_code = 1


class UnknownNameError(FpError, KeyError):
    """A plugin-provided thing (encoder, distance, ...) was asked for by an unknown name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginConflictError(FpError):
    """Two plugins registered the same name for the same kind."""


class PluginError(FpError):
    """A plugin is malformed or failed to load."""


class InputError(FpError):
    """A user-supplied file, folder or parameter is invalid."""


class InsufficientDataError(FpError):
    """There are too few samples for the requested statistic."""


class BankError(FpError):
    """The reference bank is missing, corrupt, locked or of an unsupported version."""


class OfflineError(FpError):
    """Weights or data would have to be fetched from a hub that cannot be reached."""


class FpWarning(UserWarning):
    """Something was wrong but ``fp`` carried on (e.g. a damaged cache file it set aside).

    The CLI prints these as ``Warning: <message>`` on stderr; other libraries' warnings are
    hidden unless ``fp --debug`` is given.
    """
