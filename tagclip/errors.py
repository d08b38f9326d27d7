"""The toolkit's exceptions: :class:`InputError` (bad user input, from :mod:`clip.errors`) and
:class:`Interrupted` (Ctrl-C, with what the run keeps for resuming)."""
from clip.errors import InputError

# The exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``kept`` says what was kept and how to go on (one line)."""

    def __init__(self, kept: str):
        super().__init__(kept)
        self.kept = kept


__all__ = ["InputError", "Interrupted", "EXIT_INTERRUPTED"]
