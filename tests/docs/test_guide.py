"""docs/writing-a-backend.md runs as written, so it cannot rot.

Each ```python and ```toml block starts with `# file: NAME` and is written to NAME in
a temporary directory (blocks naming the same file are appended in order). That
directory becomes the installed package the guide describes: it goes on PYTHONPATH and
its `pyproject.toml` becomes a dist-info with those entry points, which is what
`pip install .` would leave behind. Then every `vdev` command of the ```sh blocks is
run (a `vdev run` must serve a front-end on its socket and stop cleanly on SIGTERM),
and every `test_*.py` file is run by pytest in that directory.
The inner pytest runs get `--vdev-require-all` when this run has it, so that a guide
test needing QEMU or root fails in CI instead of being skipped.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from vdev.testing import Frontend
from vdev.testing.pytest_plugin import REQUIRE_ALL

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "writing-a-backend.md"
_BLOCK = re.compile(r"^```(?P<lang>\w*)\n(?P<text>.*?)^```", re.MULTILINE | re.DOTALL)
_FILE = re.compile(r"# file: (\S+)\n")


@dataclass(frozen=True)
class Block:
    lang: str
    text: str

    @property
    def file(self) -> str | None:
        match = _FILE.match(self.text)
        return match.group(1) if match else None


def guide_blocks() -> list[Block]:
    return [Block(m["lang"], m["text"]) for m in _BLOCK.finditer(GUIDE.read_text())]


def guide_files() -> dict[str, str]:
    """File name -> text, the blocks naming the same file appended in order."""
    files: dict[str, str] = {}
    for block in guide_blocks():
        if block.file is not None:
            files[block.file] = files.get(block.file, "") + _FILE.sub("", block.text, count=1)
    return files


def guide_commands() -> list[str]:
    return [
        line.strip()
        for block in guide_blocks()
        if block.lang == "sh"
        for line in block.text.splitlines()
        if line.strip().startswith("vdev ")
    ]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """The guide's package, written out and registered as installed."""
    directory = tmp_path_factory.mktemp("guide")
    for name, text in guide_files().items():
        (directory / name).write_text(text)
    project = tomllib.loads((directory / "pyproject.toml").read_text())["project"]
    dist = directory / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    (dist / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in eps.items())
            for group, eps in project["entry-points"].items()
        )
    )
    return directory


@pytest.fixture(scope="module")
def env(package) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package), env.get("PYTHONPATH")]))
    return env


def test_every_code_block_is_run():
    blocks = guide_blocks()
    assert blocks
    for block in blocks:
        if block.lang in ("python", "toml"):
            assert block.file is not None, f"a {block.lang} block has no `# file:` line"
        else:
            assert block.lang == "sh", f"no runner for ```{block.lang} blocks"
            for line in block.text.splitlines():
                assert line.startswith("vdev ") or line == "pip install .", line
    files = guide_files()
    assert {"pyproject.toml", "mydisk.py", "myport.py", "mydevice.py"} <= set(files)
    assert any(name.startswith("test_") for name in files)
    assert any(cmd.startswith("vdev run ") for cmd in guide_commands())


@pytest.mark.parametrize("command", guide_commands())
async def test_command(command, env, package, tmp_path):
    argv = [sys.executable, "-m", "vdev.cli", *shlex.split(command)[1:]]
    if argv[3] != "run":
        result = subprocess.run(
            argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
        )
        assert result.returncode == 0, result.stderr
        if argv[3] == "backends":
            project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
            for eps in project["entry-points"].values():
                for name in eps:
                    assert re.search(rf" {name} +{project['name']} ", result.stdout), name
        return
    sock = tmp_path / argv[argv.index("--socket") + 1]
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the socket never appeared"
            await trio.sleep(0.05)
        async with Frontend.connect(sock) as fe:
            await fe.negotiate()
            await fe.setup_queue(0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in proc.stderr.read()


@pytest.mark.parametrize("name", [n for n in guide_files() if n.startswith("test_")])
def test_guide_tests_pass(name, env, package, tmp_path, request):
    require_all = [REQUIRE_ALL] if request.config.getoption(REQUIRE_ALL) else []
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs"),
            f"--basetemp={tmp_path / 'inner'}",
            *require_all,
            name,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=package,
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|skipped)", out)}
    if counts.get("skipped"):
        reasons = [line for line in out.splitlines() if line.startswith("SKIPPED")]
        (pytest.fail if require_all else pytest.skip)(f"{name}: " + "; ".join(reasons))
    assert counts.get("passed", 0) > 0, out
