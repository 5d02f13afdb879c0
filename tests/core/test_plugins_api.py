"""Plugins use the public API only: the built-in backends, the example plugin and the
guide's code import nothing from vdev but the documented public modules, and each
public module lists its exports in `__all__` and in its docstring."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The modules a plugin may import from vdev (README, "Public API for plugins").
PUBLIC_MODULES = (
    "vdev.backend",
    "vdev.net",
    "vdev.netsetup",
    "vdev.devices.base",
    "vdev.plugins",
)
#: ... and the test helpers, with every module under them.
PUBLIC_PACKAGES = ("vdev.testing",)

#: Where plugin code lives in this repository.
PLUGIN_CODE = (ROOT / "backends", ROOT / "examples")
GUIDES = ROOT / "docs"


def is_public(module: str) -> bool:
    if module != "vdev" and not module.startswith("vdev."):
        return True  # not vdev's: the standard library, pyroute2, the plugin itself
    return module in PUBLIC_MODULES or any(
        module == p or module.startswith(p + ".") for p in PUBLIC_PACKAGES
    )


def private_imports(source: str, filename: str = "<source>") -> list[str]:
    """The vdev modules `source` imports that are not public, as "line: module"."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from vdev import netsetup` imports the module vdev.netsetup.
            modules = (
                [f"vdev.{alias.name}" for alias in node.names]
                if node.module == "vdev"
                else [node.module]
            )
        else:
            continue
        found += [f"{node.lineno}: {m}" for m in modules if not is_public(m)]
    return found


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)


def plugin_sources() -> list[tuple[str, str]]:
    sources = [
        (str(path.relative_to(ROOT)), path.read_text())
        for base in PLUGIN_CODE
        for path in sorted(base.rglob("*.py"))
    ]
    for guide in sorted(GUIDES.rglob("*.md")):
        for n, block in enumerate(python_blocks(guide.read_text()), 1):
            sources.append((f"{guide.relative_to(ROOT)} block {n}", block))
    return sources


def test_the_scan_covers_backends_examples_and_guides():
    names = [name for name, _ in plugin_sources()]
    assert "backends/net_tap.py" in names
    assert "examples/vdev-rng/vdev_rng/__init__.py" in names
    assert any(name.startswith("docs/writing-a-backend.md block") for name in names)


@pytest.mark.parametrize(("name", "source"), plugin_sources(), ids=lambda v: v[:60])
def test_plugin_code_imports_only_public_modules(name, source):
    assert private_imports(source, name) == [], f"{name} imports vdev internals"


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("from vdev.devices.net import NetFeature", ["1: vdev.devices.net"]),
        ("import vdev.units", ["1: vdev.units"]),
        ("from vdev import netsetup, units", ["1: vdev.units"]),
        ("def f():\n    from vdev.virtio.chain import DescriptorChain", ["2: vdev.virtio.chain"]),
        ("from vdev import __version__", ["1: vdev.__version__"]),
        ("from vdev.net import NetFeature\nfrom vdev.backend import NetBackend", []),
        ("from vdev.testing.frontend import Frontend\nimport os, pyroute2", []),
        ("from . import sibling\nfrom vdev_backends.blk_null import fill_zeros", []),
    ],
)
def test_private_imports_are_found(source, flagged):
    assert private_imports(source) == flagged


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_module_documents_its_exports(name):
    module = importlib.import_module(name)
    exports = module.__all__
    assert exports, f"{name} exports nothing"
    missing = [e for e in exports if not hasattr(module, e)]
    assert missing == [], f"{name}.__all__ names what it does not define"
    undocumented = [e for e in exports if f"`{e}" not in (module.__doc__ or "")]
    assert undocumented == [], f"{name}'s docstring does not list {undocumented}"


def test_readme_lists_the_public_modules():
    readme = (ROOT / "README.md").read_text()
    for name in (*PUBLIC_MODULES, *PUBLIC_PACKAGES):
        assert f"`{name}`" in readme, name
    assert "docs/writing-a-backend.md" in readme
