"""Shared pytest setup: put the repository root first on sys.path.

This lets `python -m pytest` find the local `clip` and `tagclip` packages
from any working directory, even without an installed copy.
"""
import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path[:1] != [_REPO_ROOT]:
    sys.path.insert(0, _REPO_ROOT)

# The shared test helpers (tests/helpers.py) are imported as a top-level module.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(1, _TESTS_DIR)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    """The golden tiny CLIP (float16 checkpoint in float32), loaded once per session."""
    import helpers

    return helpers.tiny_model()
