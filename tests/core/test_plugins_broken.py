"""A plugin whose import fails is one line naming it, never a traceback or a hidden listing.

The plugins are real: a distribution (dist-info with entry points) and its modules are
written to a directory put on sys.path (in-process) or PYTHONPATH (subprocesses), so
importlib.metadata finds them exactly as it finds a pip-installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vdev.cli import main
from vdev.devices.blk import REQUEST_HEADER, RequestType
from vdev.plugins import Kind, PluginImportError, load, plugins
from vdev.testing.frontend import Frontend

DIST = "vdev-broken-plugins"
#: Module name -> source, and what its import error must say.
MODULES = {
    "broken_syntax": ("class Disk(:\n", "SyntaxError"),
    "broken_raises": ("raise RuntimeError('no licence server')\n", "RuntimeError: no licence"),
    "broken_attr": ("X = 1\n", "AttributeError"),
    "broken_exits": ("raise SystemExit(3)\n", "SystemExit: 3"),
}
ENTRY_POINTS = """\
[vdev.blk_backends]
missing = broken_missing_module:Disk
syntax = broken_syntax:Disk
raises = broken_raises:Disk
attr = broken_attr:Disk
exits = broken_exits:Disk

[vdev.devices]
broken = broken_raises:Device
"""
#: Every broken entry point: (kind, name, what the error names).
BROKEN = [
    (Kind.BLK_BACKEND, "missing", "ModuleNotFoundError: No module named 'broken_missing_module'"),
    (Kind.BLK_BACKEND, "syntax", MODULES["broken_syntax"][1]),
    (Kind.BLK_BACKEND, "raises", MODULES["broken_raises"][1]),
    (Kind.BLK_BACKEND, "attr", MODULES["broken_attr"][1]),
    (Kind.BLK_BACKEND, "exits", MODULES["broken_exits"][1]),
    (Kind.DEVICE, "broken", MODULES["broken_raises"][1]),
]
VDEV = [sys.executable, "-m", "vdev.cli"]


def install_broken(directory: Path) -> Path:
    dist = directory / "vdev_broken_plugins-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    for module, (source, _) in MODULES.items():
        (directory / f"{module}.py").write_text(source)
    return directory


@pytest.fixture
def broken_path(tmp_path, monkeypatch):
    site = install_broken(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    yield site
    for module in MODULES:
        sys.modules.pop(module, None)


@pytest.fixture
def broken_env(tmp_path):
    site = install_broken(tmp_path / "site")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize(("kind", "name", "error"), BROKEN, ids=[b[1] for b in BROKEN])
def test_load_names_entry_point_distribution_and_error(broken_path, kind, name, error):
    with pytest.raises(PluginImportError) as info:
        load(kind, name)
    message = str(info.value)
    assert "\n" not in message
    assert f"{kind.label} {name!r}" in message
    assert f"of distribution {DIST!r}" in message
    assert error in message
    target = next(p.target for p in plugins(kind) if p.name == name)
    assert f"entry point {target!r}" in message


def test_listing_imports_nothing(broken_path):
    names = {p.name for p in plugins(Kind.BLK_BACKEND)}
    assert {"missing", "syntax", "raises", "attr", "file", "ram"} <= names
    assert not set(MODULES) & set(sys.modules)


def test_backends_lists_the_others_and_exits_2(broken_path, capsys):
    assert main(["backends"]) == 2
    out, err = capsys.readouterr()
    rows = {tuple(line.split()[:3]) for line in out.splitlines()}
    assert ("blk", "backend", "file") in rows and ("device", "blk", "vdev") in rows
    assert DIST not in out
    lines = err.strip().splitlines()
    assert len(lines) == len(BROKEN)
    for (kind, name, error), line in zip(sorted(BROKEN, key=_listing_order), lines, strict=True):
        assert line.startswith(f"vdev backends: error: {kind.label} {name!r}") and error in line


def _listing_order(broken: tuple[Kind, str, str]) -> tuple[int, str]:
    return list(Kind).index(broken[0]), broken[1]


def test_backends_subprocess(broken_env):
    result = subprocess.run(
        [*VDEV, "backends"], capture_output=True, text=True, env=broken_env, timeout=60
    )
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == len(BROKEN), result.stderr
    for name in ("file", "ram", "null", "tap", "echo"):
        assert f" {name} " in result.stdout


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["blk", "--backend", "syntax"], "blk backend 'syntax'"),
        (["blk", "--backend", "missing"], "No module named 'broken_missing_module'"),
        (["broken"], "device 'broken'"),
    ],
)
def test_run_with_a_broken_plugin_is_one_line_exit_2(broken_env, tmp_path, args, error):
    result = subprocess.run(
        [*VDEV, "run", *args, "--socket", str(tmp_path / "s.sock")],
        capture_output=True,
        text=True,
        env=broken_env,
        timeout=60,
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vdev run: error: ") and error in lines[0]
    assert f"distribution {DIST!r}" in lines[0]


async def test_run_of_another_backend_is_unaffected(broken_env, vdev_daemon):
    daemon = await vdev_daemon("blk", "--backend", "ram", "--size", "1M", env=broken_env)
    async with Frontend.connect(daemon.socket) as fe:
        await fe.negotiate()
        queue = await fe.setup_queue(0)
        get_id = REQUEST_HEADER.pack(RequestType.GET_ID, 0, 0)
        used = await queue.transact([get_id], [20, 1])
        assert used.data[-1] == b"\0"
    assert await daemon.stop() == 0
    assert "Traceback" not in daemon.log_text()
