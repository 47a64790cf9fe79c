"""The layers import downwards only, as docs/architecture.md draws them: no module imports a
package of its own layer or above (its own package aside), and every package says in its
docstring which packages it may import."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "displback"

#: Lowest first. A package may import the packages of the layers below its own, none beside
#: it or above it (docs/architecture.md, "Layers").
LAYERS: list[set[str]] = [
    {"mapping", "protocol"},
    {"display", "xenstore", "systemd"},
    {"kms", "xen", "wayland", "evdev"},
    {"backend"},
    {"sim"},
    {"app"},
]
_LAYER_OF = {package: n for n, layer in enumerate(LAYERS) for package in layer}


def package_of(module: str) -> str:
    """``displback.kms.output`` → ``kms``; the top-level modules are their own package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def may_import(package: str) -> set[str]:
    """The packages ``package`` may import: those of every layer below its own."""
    below = LAYERS[: _LAYER_OF[package]]
    return set().union(*below)


def displback_imports(source: str) -> set[str]:
    """The ``displback.*`` modules ``source`` imports (also under TYPE_CHECKING or inside a
    function: a lazy import is an import all the same)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "displback":  # a module of the package, or a name of its own
                for alias in node.names:
                    module = (ROOT / alias.name).is_dir() or (ROOT / f"{alias.name}.py").exists()
                    found.add(f"displback.{alias.name}" if module else "displback")
            elif node.module.startswith("displback."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("displback.")}
    return found


def upward_imports(modules: dict[str, str]) -> list[str]:
    """``module imports target`` for each import the layers forbid, of ``{module: source}``."""
    wrong = []
    for module, source in sorted(modules.items()):
        own = package_of(module)
        if own not in _LAYER_OF:
            continue  # displback/__init__.py, __main__.py: checked by their own rule below
        for target in sorted(displback_imports(source)):
            theirs = package_of(target)
            if theirs and theirs != own and theirs not in may_import(own):
                wrong.append(f"{module} imports {target}")
    return wrong


def tree() -> dict[str, str]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path.read_text()
    return modules


def test_every_package_of_displback_has_its_layer() -> None:
    packages = {package_of(m) for m in tree()} - {"", "__main__"}
    assert packages == set(_LAYER_OF)


def test_no_module_imports_its_own_layer_or_above() -> None:
    assert upward_imports(tree()) == []


def test_the_top_level_modules_import_only_the_application() -> None:
    modules = tree()
    assert displback_imports(modules["displback"]) == set()
    assert {package_of(m) for m in displback_imports(modules["displback.__main__"])} == {"app"}


@pytest.mark.parametrize(
    ("module", "source", "wrong"),
    [
        ("displback.protocol.ring", "from displback.backend.connector import Connector", True),
        ("displback.display.virtual", "import displback.kms.device", True),
        ("displback.xen.real", "from displback.kms import uapi", True),  # beside, not below
        ("displback.kms.output", "if TYPE_CHECKING:\n    from displback.app.run import x", True),
        ("displback.backend.device", "def f():\n    from displback.sim.guest import g", True),
        ("displback.sim.guest", "from displback.backend.buffers import BufferStore", False),
        ("displback.kms.output", "from displback.kms.commit import Committer", False),
    ],
)
def test_the_rule_names_an_upward_import(module: str, source: str, wrong: bool) -> None:
    assert bool(upward_imports({module: source})) is wrong


@pytest.mark.parametrize("package", sorted(_LAYER_OF))
def test_each_package_docstring_says_what_it_may_import(package: str) -> None:
    source = tree()[f"displback.{package}"]
    docstring = ast.get_docstring(ast.parse(source)) or ""
    match = re.search(r"^May import: (.*?)\.$", docstring, re.M | re.S)
    assert match is not None, f"displback/{package}: no 'May import: ….' line"
    said = set(re.findall(r"``displback\.(\w+)``", match.group(1)))
    assert said == may_import(package), f"displback/{package} says {sorted(said)}"


def test_every_module_opens_with_a_docstring() -> None:
    missing = [m for m, source in tree().items() if not ast.get_docstring(ast.parse(source))]
    assert missing == []
