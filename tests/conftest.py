"""Shared pytest setup.

* The repository root goes first on sys.path, so `python -m pytest` finds the local `clip`
  and `tagclip` packages from any working directory, even without an installed copy.
* The user caches (``TAGCLIP_CACHE``, ``XDG_CACHE_HOME``) point at a temporary folder of the
  session, set before collection, so no test (nor a subprocess a test starts: they inherit
  the environment) writes into ``~/.cache``.
* An autouse session guard fails the run when a test created, removed or modified a file of
  the repository or of the working directory: tests write under ``tmp_path`` only.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_REPO_ROOT = str(REPO_ROOT)
if sys.path[:1] != [_REPO_ROOT]:
    sys.path.insert(0, _REPO_ROOT)

# The shared test helpers (tests/helpers.py) are imported as a top-level module.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(1, _TESTS_DIR)

import pytest  # noqa: E402

# ----------------------------------------------------------------------------- user caches

CACHE_VARIABLES = ("TAGCLIP_CACHE", "XDG_CACHE_HOME")
_saved_environment: dict[str, "str | None"] = {}
_session_cache_dir: "str | None" = None


def pytest_configure(config):
    """Before collection: both cache variables point into one temporary folder of the run;
    Ctrl+C heard again where the run was started ignoring it."""
    global _session_cache_dir
    # A job started with `&` by a non-interactive shell (nohup, CI wrappers) ignores SIGINT, and
    # exec'd children inherit an ignored signal: the Ctrl+C tests' subprocesses would never see
    # theirs. Python's own handler is reset to the default in children, so they hear it again.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _session_cache_dir = tempfile.mkdtemp(prefix="tagclip-test-session-cache-")
    values = {"TAGCLIP_CACHE": os.path.join(_session_cache_dir, "tagclip"),
              "XDG_CACHE_HOME": os.path.join(_session_cache_dir, "xdg")}
    for name in CACHE_VARIABLES:
        _saved_environment[name] = os.environ.get(name)
        os.environ[name] = values[name]


def pytest_unconfigure(config):
    for name, value in _saved_environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved_environment.clear()
    if _session_cache_dir is not None:
        shutil.rmtree(_session_cache_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- write guard

# Never compared: version control, the environment, and what Python / pytest / packaging write.
_SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache"}
_SKIPPED_TOP_DIRS = {"build"}


def _skipped_dir(name: str, at_top: bool) -> bool:
    return name in _SKIPPED_DIRS or name.endswith(".egg-info") or (at_top and name in _SKIPPED_TOP_DIRS)


def _state(path: Path) -> tuple:
    st = path.lstat()
    kind = "link" if path.is_symlink() else ("dir" if path.is_dir() else "file")
    return (kind, st.st_size if kind != "dir" else 0, st.st_mtime_ns if kind != "dir" else 0)


def snapshot_repository(root: Path) -> dict[str, tuple]:
    """Relative path -> (kind, size, mtime) of every file, link and folder under ``root``,
    skipping .git, .venv, __pycache__, .pytest_cache, *.egg-info and the top-level build/."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        at_top = Path(dirpath) == root
        dirnames[:] = [d for d in dirnames if not _skipped_dir(d, at_top)]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                out[str(p.relative_to(root))] = _state(p)
            except FileNotFoundError:  # vanished while walking: it is simply not there
                pass
    return out


def snapshot_listing(folder: Path) -> dict[str, tuple]:
    """Name -> (kind, size, mtime) of the entries directly in ``folder``."""
    out: dict[str, tuple] = {}
    for p in folder.iterdir():
        try:
            out[p.name] = _state(p)
        except FileNotFoundError:
            pass
    return out


def snapshot_changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """'created X' / 'removed X' / 'modified X' lines, sorted by path."""
    lines = []
    for key in sorted(set(before) | set(after)):
        if key not in before:
            lines.append(f"created {key}")
        elif key not in after:
            lines.append(f"removed {key}")
        elif before[key] != after[key]:
            lines.append(f"modified {key}")
    return lines


@pytest.fixture(scope="session", autouse=True)
def no_writes_into_repository_or_cwd():
    """Fail the session if any test changed the repository tree or the working directory."""
    cwd = Path.cwd().resolve()
    cwd_in_repo = cwd == REPO_ROOT or REPO_ROOT in cwd.parents
    repo_before = snapshot_repository(REPO_ROOT)
    cwd_before = None if cwd_in_repo else snapshot_listing(cwd)
    yield
    problems = [f"{line} (in the repository {REPO_ROOT})"
                for line in snapshot_changes(repo_before, snapshot_repository(REPO_ROOT))]
    if cwd_before is not None:
        problems += [f"{line} (in the working directory {cwd})"
                     for line in snapshot_changes(cwd_before, snapshot_listing(cwd))]
    if problems:
        raise AssertionError("tests wrote outside their temporary folders:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- models

@pytest.fixture(scope="session")
def tiny_model():
    """The golden tiny CLIP (float16 checkpoint in float32), loaded once per session."""
    import helpers

    return helpers.tiny_model()
