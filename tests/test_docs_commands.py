"""Every shell command a documentation page marks as runnable runs, as a reader would type it.

A runnable block is a fenced block with the class `.runnable`: one command (`asirra`, `python`),
written at the size a reader would run it. The test runs each page's blocks in order in a fresh folder
where `data/dogs-vs-cats` is a small stratified sample of the shared data (links, not copies), with
`quick="..."` appended to the command (the last value of a repeated option wins). A block with
`background="http://127.0.0.1:8000/"` starts a server, waited for until that URL answers and stopped
at the end of the page; its port is replaced by a free one in that block and the ones after it.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import PROJECT_ROOT, require_shared_data

DOCS = PROJECT_ROOT / "docs"
BLOCK = re.compile(r"^```bash \{([^}]*\.runnable[^}]*)\}\n(.*?)^```", re.S | re.M)
ATTRIBUTE = re.compile(r'(\w+)="([^"]*)"')
SAMPLE = {"train_per_class": 100, "test": 20}  # the small data every runnable command runs on


def runnable_blocks(page: Path) -> list[dict]:
    blocks = []
    for attributes, body in BLOCK.findall(page.read_text()):
        command = " ".join(body.replace("\\\n", " ").split())
        blocks.append({"command": command, **dict(ATTRIBUTE.findall(attributes))})
    return blocks


PAGES = [p for p in sorted(DOCS.rglob("*.md")) if runnable_blocks(p)]


def test_every_guide_has_runnable_commands():
    guides = sorted((DOCS / "guides").glob("*.md"))
    assert guides and not [p.name for p in guides if p not in PAGES]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_runnable_blocks_are_single_commands(page):
    for block in runnable_blocks(page):
        words = shlex.split(block["command"])
        assert words[0] in ("asirra", "python"), block["command"]
        assert not {";", "&&", "||", "|"} & set(words) and "#" not in block["command"], block["command"]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A Kaggle-style root of links to a stratified sample of the shared data: train/ and test1/."""
    shared = require_shared_data()
    root = tmp_path_factory.mktemp("docs-data") / "dogs-vs-cats"
    for label in ("cat", "dog"):
        (root / "train").mkdir(parents=True, exist_ok=True)
        for i in range(1000, 1000 + SAMPLE["train_per_class"]):  # 200x200 photos, as most of the set
            (root / "train" / f"{label}.{i}.jpg").symlink_to(shared / "train" / f"{label}.{i}.jpg")
    (root / "test1").mkdir()
    for i in range(1, SAMPLE["test"] + 1):
        (root / "test1" / f"{i}.jpg").symlink_to(shared / "test1" / f"{i}.jpg")
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen, seconds: float = 180.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}: {server.stdout.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds:.0f} s")


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_runnable_commands_run(page, small_data, tmp_path, docs_cache):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dogs-vs-cats").symlink_to(small_data)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "ASIRRA_CACHE": str(docs_cache)}
    env.pop("ASIRRA_DATA", None)  # the commands find data/dogs-vs-cats as a reader's would
    servers, ports = [], {}
    try:
        for block in runnable_blocks(page):
            command = block["command"] + (" " + block["quick"] if "quick" in block else "")
            if "background" in block:
                ports[str(re.search(r":(\d+)", block["background"]).group(1))] = str(_free_port())
            for old, new in ports.items():
                command = command.replace(f":{old}", f":{new}").replace(f"--port {old}", f"--port {new}")
            if "background" in block:
                url = block["background"]
                for old, new in ports.items():
                    url = url.replace(f":{old}", f":{new}")
                server = subprocess.Popen(["bash", "-c", command], cwd=tmp_path, env=env, start_new_session=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                servers.append(server)
                _wait_for(url, server)
                continue
            ran = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=600)
            assert ran.returncode == 0, f"{command}\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
    finally:
        for server in servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)


@pytest.fixture(scope="session")
def docs_cache(tmp_path_factory) -> Path:
    """One pixel and activation cache for every page: pages that train the same probe reuse its features."""
    return tmp_path_factory.mktemp("docs-cache")
