"""Shared by the service, attack, load and browser tests: a pool of synthetic pets and a bot that sees colour.

Cats are drawn reddish and dogs bluish, so a "classifier" that compares the red and blue channels
labels them perfectly through any crop, resize or JPEG re-encoding the service applies. That lets
tests check the serving and attacking plumbing without the real model.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
from PIL import Image

from asirra.captcha.attack.bot import RandomGuesser  # noqa: F401  (the tests import it from here)
from asirra.captcha.service.settings import ServiceSettings
from asirra.data import scan
from asirra.images import load_image
from asirra.labels import CAT, DOG

with warnings.catch_warnings():
    # Starlette asks for the `httpx2` fork for its TestClient; plain httpx works and is what we ship.
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient  # noqa: F401  (re-exported for the tests)

# Limits high enough that only the test that means to hit one does.
GENEROUS = ServiceSettings(challenge_rate=1000, challenge_burst=1000, request_rate=10_000,
                           request_burst=10_000, max_per_client=1000, seed=0)


def make_pool(folder: Path, cats: int = 12, dogs: int = 12, seed: int = 0, disguised: int = 0) -> list:
    """Kaggle-named JPEGs in `folder` (cats reddish, dogs bluish, each a little different), scanned.

    The first `disguised` cats are drawn bluish: images the colour bot always gets wrong.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for label, count in ((CAT, cats), (DOG, dogs)):
        for i in range(count):
            pixels = rng.integers(0, 90, size=(64, 80, 3))
            looks_like_cat = label == CAT and i >= disguised
            pixels[..., 0 if looks_like_cat else 2] += 150
            name = f"{'cat' if label == CAT else 'dog'}.{i}.jpg"
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name, quality=90)
    return scan(folder)


class FakeClock:
    """A clock the test moves by hand, so expiry and rate limits are tested without sleeping."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class ColourClassifier:
    """Calls an image a cat when it is redder than it is blue; `flip` makes it wrong on purpose."""

    name = "colour"

    def __init__(self, flip: bool = False):
        self.flip = flip

    def predict_proba(self, sources) -> np.ndarray:
        """(n, 2): P(cat), P(dog), as every classifier's."""
        p_dog = []
        for source in sources:
            mean = np.asarray(load_image(source), dtype=np.float64).mean(axis=(0, 1))
            p_dog.append(float(mean[2] > mean[0]))
        p_dog = np.asarray(p_dog)
        p_dog = 1.0 - p_dog if self.flip else p_dog
        return np.stack([1 - p_dog, p_dog], axis=1)

    def solve(self, sources) -> list[bool]:
        return [bool(p < 0.5) for p in self.predict_proba(sources)[:, 1]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(args: list[str], log: Path, start_seconds: float = 90.0,
            env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """The real `asirra serve ARGS` (with `env` added to the environment) on a free loopback port, up and
    answering /healthz; always stopped after.

    It runs in its own process group, so uvicorn's worker processes go down with it.
    """
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "asirra", "serve", "--port", str(port), *args],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_seconds
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"asirra serve exited with {process.returncode}: {log.read_text()[-800:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"asirra serve did not answer within {start_seconds:.0f} s: {log.read_text()[-800:]}")
            time.sleep(0.1)
        yield url, process
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """Ctrl-C to the server's process group, then a kill if it has not gone within 10 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # any worker left behind
    except ProcessLookupError:
        pass


# ---- talking to an app in a test ------------------------------------------------------------


def new_challenge(client, sitekey=None) -> dict:
    """POST /api/challenge (for a site, with its key), asserting it was issued."""
    response = client.post("/api/challenge", params={"sitekey": sitekey} if sitekey else None)
    assert response.status_code == 200, response.text
    return response.json()


def answer(client, challenge_id, selected):
    return client.post(f"/api/challenge/{challenge_id}/answer", json={"selected": sorted(selected)})


def truth(app, challenge) -> set[int]:
    """The cats of an issued challenge, read from the app in-process (no route exposes them)."""
    return set(app.state.store.peek(challenge["id"]).challenge.answer)


def check_a_full_table_replaces_instead_of_refusing(a, b, c) -> None:
    """Three clients of a service with max_challenges=2 (StoreSettings.max_challenges): when full, a client
    holding challenges replaces its own oldest, one holding none the oldest of all; nobody gets a refusal."""
    a1, b1 = new_challenge(a), new_challenge(b)
    a2 = new_challenge(a)  # full, and a holds one: a1 goes
    c1 = new_challenge(c)  # full, and c holds none: the oldest of all, b1, goes
    assert a.get("/healthz").json()["outstanding"] == 2
    for client, challenge in ((a, a1), (b, b1)):
        replaced = answer(client, challenge["id"], [])
        assert replaced.status_code == 410 and "replaced" in replaced.json()["error"]
    for client, challenge in ((a, a2), (c, c1)):
        assert answer(client, challenge["id"], []).status_code == 200
