"""Re-export of :class:`clip.errors.InputError`, the one error type for bad user input."""
from clip.errors import InputError

__all__ = ["InputError"]
