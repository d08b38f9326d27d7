"""The layers of the repository, read from the import statements of every module.

    root scripts   classify.py  generate_cams.py  eval_cam.py  eval_cam_with_crf.py
    pipelines/     what composes both stages (tagclip segment, demo, prepare, the tagclip command)
    tagclip/ clip_es/   the two stages, side by side: neither imports the other
    clip/          the backbone: knows no method
    toolkit/       what every stage shares (errors, files, resume, sharding, images, flags, ...)

A module may import its own package and the packages in layers below it, nothing else; there
is no import circle between modules (imports inside functions included: they run too).
"""
from __future__ import annotations

import ast
from pathlib import Path

import helpers
import pytest

PACKAGES = ("toolkit", "clip", "tagclip", "clip_es", "pipelines")
ROOT_SCRIPTS = ("classify", "generate_cams", "eval_cam", "eval_cam_with_crf")
# Layer of each package (root scripts on top): a module imports from its own layer or below.
LAYER = {"toolkit": 0, "clip": 1, "tagclip": 2, "clip_es": 2, "pipelines": 3, **{s: 4 for s in ROOT_SCRIPTS}}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path, packages=PACKAGES, scripts=ROOT_SCRIPTS) -> dict[str, set[str]]:
    """Module -> the project's modules it imports (anywhere in its body), from the source.

    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``;
    importing ``a.b`` also runs ``a`` (its ``__init__``), which counts too."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    files.update({s: root / f"{s}.py" for s in scripts if (root / f"{s}.py").exists()})
    graph: dict[str, set[str]] = {}

    def with_parents(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(files)

    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges |= with_parents(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                edges |= with_parents(target)
                for alias in node.names:
                    edges |= with_parents(f"{target}.{alias.name}")
        edges.discard(name)
        # a module's own package __init__ runs before it: not an import the module makes
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up a layer or sideways between the stages."""
    bad = []
    for module, targets in graph.items():
        own = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other != own and LAYER[other] >= LAYER[own]:
                bad.append(f"{module} -> {target}")
    return bad


REPO = helpers.REPO_ROOT
GRAPH = import_graph(REPO)


def test_the_graph_sees_every_package_and_script():
    assert {m.split(".")[0] for m in GRAPH} == set(PACKAGES) | set(ROOT_SCRIPTS)
    assert "pipelines.command" in GRAPH["pipelines.__main__"]
    assert {"clip.kernels", "toolkit.errors"} <= GRAPH["clip.model"]
    assert "tagclip.cli" in GRAPH["classify"]


def test_no_import_circle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_every_import_goes_down_a_layer_or_stays_in_its_package():
    """Rules: classification never imports segmentation (nor the reverse: the stages are
    siblings); what composes both sits above both; the backbone knows no method; packages
    never import the root scripts; toolkit imports no other package of the project."""
    assert layer_violations(GRAPH) == []


# ----------------------------------------------------------------------------- the checker itself

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


def test_checker_finds_a_circle_through_a_function_level_import(tmp_path):
    root = _tree(tmp_path, {"tagclip/a.py": "from . import b\n",
                            "tagclip/b.py": "def f():\n    from .a import g\n"})
    cycle = find_cycle(import_graph(root))
    assert cycle is not None and set(cycle) == {"tagclip.a", "tagclip.b"}


@pytest.mark.parametrize("files, expected", [
    ({"tagclip/vis.py": "from clip_es.masks import IGNORE_LABEL\n", "clip_es/masks.py": ""},
     "tagclip.vis -> clip_es.masks"),
    ({"clip/model.py": "from tagclip import method\n", "tagclip/method.py": ""}, "clip.model -> tagclip.method"),
    ({"toolkit/x.py": "import clip.model\n", "clip/model.py": ""}, "toolkit.x -> clip.model"),
    ({"tagclip/cli.py": "def f():\n    import pipelines.segment\n", "pipelines/segment.py": ""},
     "tagclip.cli -> pipelines.segment"),
    ({"pipelines/demo.py": "import classify\n", "classify.py": ""}, "pipelines.demo -> classify"),
])
def test_checker_finds_an_import_against_the_layers(tmp_path, files, expected):
    assert expected in layer_violations(import_graph(_tree(tmp_path, files)))
