"""One exception type for bad user input, and how a name taken from a file appears in its message.

Every problem a user can cause (a missing image, a corrupt checkpoint, a malformed split
file) is raised as :class:`InputError` with a one-line message that names the file and the
problem. The command-line entry points print ``error: <message>`` and exit non-zero instead of
showing a traceback.
"""


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


MAX_NAME_CHARS = 120  # a name taken from a file (a key, a global) is cut to this in messages


def printable(name: object) -> str:
    """``name`` fit for a one-line message: as it is if it is a printable string, else its
    ``repr``; cut to :data:`MAX_NAME_CHARS`."""
    text = name if isinstance(name, str) and name.isprintable() else repr(name)
    return text if len(text) <= MAX_NAME_CHARS else text[: MAX_NAME_CHARS - 3] + "..."
