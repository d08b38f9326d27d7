"""The toolkit's exceptions, exit statuses, and how a problem becomes one line.

Every problem a user can cause (a missing image, a corrupt checkpoint, a malformed split
file) is raised as :class:`InputError` with a one-line message that names the file and the
problem; the commands print ``error: <message>`` and exit with :data:`EXIT_INPUT_ERROR`
instead of showing a traceback. A foreign exception's text (PIL's, the OS's, torch's) enters
such a message only through :func:`short_reason`, so messages stay one short line.
"""
from __future__ import annotations

from typing import Optional

EXIT_SKIPPED_IMAGES = 1   # the run finished, but some images failed and were skipped (--on_error skip)
EXIT_INPUT_ERROR = 2      # bad input or arguments stopped the run (one "error:" line)
EXIT_INTERRUPTED = 130    # Ctrl-C (128 + SIGINT, as shells report it)
EXIT_TERMINATED = 143     # SIGTERM (128 + SIGTERM): stopped as cleanly as by Ctrl-C
EXIT_INTERNAL_ERROR = 70  # a bug (traceback shown); sysexits.h's EX_SOFTWARE

# A foreign exception's text is cut to this many characters in a message.
MAX_REASON_CHARS = 160
# A name taken from a file (a key, a global) is cut to this many characters in a message.
MAX_NAME_CHARS = 120


def shown_path(path: str) -> str:
    """A path as messages show it: as it is, or quoted with escapes when it holds a newline,
    tab or other unprintable character, so that the message stays one readable line."""
    return path if path.isprintable() else repr(path)


class InputError(Exception):
    """Bad input named by file: ``InputError(path, problem)`` -> ``"<path>: <problem>"``."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{shown_path(self.path)}: {problem}")

    def __reduce__(self):  # picklable across DataLoader workers and process pools
        return (type(self), (self.path, self.problem))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``kept`` says what was kept and how to go on (one line)."""

    def __init__(self, kept: str):
        super().__init__(kept)
        self.kept = kept


def printable(name: object) -> str:
    """``name`` fit for a one-line message: as it is if it is a printable string, else its
    ``repr``; cut to :data:`MAX_NAME_CHARS`."""
    text = name if isinstance(name, str) and name.isprintable() else repr(name)
    return text if len(text) <= MAX_NAME_CHARS else text[: MAX_NAME_CHARS - 3] + "..."


def short_reason(exc: BaseException, path: Optional[str] = None) -> str:
    """The one-line form of a foreign exception: an OSError's ``strerror``, else the first
    non-blank line of its text (without ``path``, which the message names already), else the
    exception's type name; cut to :data:`MAX_REASON_CHARS`."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc)
        if path:
            for form in (repr(path), path):
                text = text.replace(form, "")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


__all__ = ["InputError", "Interrupted", "printable", "shown_path", "short_reason", "EXIT_SKIPPED_IMAGES",
           "EXIT_INPUT_ERROR", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "EXIT_INTERNAL_ERROR"]
