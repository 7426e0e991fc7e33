"""Serving at the cost of an encode: each photo is decoded once into a bounded cache, and every serving is
still a fresh crop, size and re-encoding (no two byte-identical), so the lookup attack gets no easier."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from captcha_service_support import GENEROUS, TestClient, make_pool, new_challenge
from PIL import Image

from asirra.captcha.rendering import Renderer
from asirra.captcha.safeguards import make_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.images import ENTRY_OVERHEAD, ImageCache, ImageServer
from asirra.captcha.service.settings import ServiceError, ServiceSettings
from asirra.images import UnusableImage


@pytest.fixture
def pool(tmp_path):
    return make_pool(tmp_path / "pool", cats=6, dogs=6)


def test_every_serving_of_a_cached_photo_is_a_fresh_copy(pool):
    server = ImageServer(pool, GENEROUS)
    ref = pool[0]
    copies = [server.jpeg(ref)] + [server.cached_jpeg(ref) for _ in range(59)]
    assert len({hashlib.sha256(c).hexdigest() for c in copies}) == 60  # never the same bytes twice
    sides = [max(Image.open(io.BytesIO(c)).size) for c in copies]
    assert len(set(sides)) > 10  # the size is drawn anew each time (within the 200-240 range)
    assert all(200 <= side <= 240 for side in sides)
    assert server.cache.stats()["hits"] == 59  # decoded once


def test_the_cache_stays_within_its_bound_and_evicts_the_least_recently_served(pool):
    one = ImageServer(pool, GENEROUS).base(pool[0]).nbytes + ENTRY_OVERHEAD  # every synthetic photo is 80x64
    settings = ServiceSettings(**{**GENEROUS.__dict__, "image_cache_mb": 3.5 * one / 2**20})
    server = ImageServer(pool, settings)
    for _ in range(3):
        for ref in pool:
            if server.cached_jpeg(ref) is None:  # as the route asks: the cache first, then a decode
                server.jpeg(ref)
            assert server.cache.bytes <= server.cache.limit
    stats = server.cache.stats()
    assert stats["entries"] == 3 and stats["bytes"] == 3 * one  # full, never over
    assert stats["hits"] == 0  # cycling 12 photos through 3 slots: least recently used is always the next asked
    assert server.cached_jpeg(pool[-1]) is not None and server.cached_jpeg(pool[0]) is None


def test_the_cache_counts_every_byte_it_holds_and_a_zero_cache_holds_none():
    cache = ImageCache(limit_bytes=10_000)
    for key, side in (("a", 20), ("b", 30), ("a", 10)):  # "a" replaced by a smaller copy
        cache.put(key, np.zeros((side, side, 3), np.uint8))
    assert cache.bytes == 10 * 10 * 3 + 30 * 30 * 3 + 2 * ENTRY_OVERHEAD
    cache.put("huge", np.zeros((100, 100, 3), np.uint8))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and cache.stats()["entries"] == 2
    empty = ImageCache(limit_bytes=0)
    empty.put("a", np.zeros((2, 2, 3), np.uint8))
    assert empty.get("a") is None and empty.bytes == 0


def test_a_cached_photo_cannot_be_drawn_on(pool):
    base = ImageServer(pool, GENEROUS).base(pool[0])
    with pytest.raises(ValueError):
        base[0, 0] = 0


def test_with_no_cache_and_pillow_only_the_service_still_serves_fresh_copies(pool):
    settings = ServiceSettings(**{**GENEROUS.__dict__, "image_cache_mb": 0, "renderer": "pillow"})
    app = create_app(pool, make_safeguard("none"), settings)
    client = TestClient(app)
    url = new_challenge(client)["images"][0]
    assert client.get(url).status_code == 200
    health = client.get("/healthz").json()
    assert health["image_cache"]["entries"] == 0 and health["renderer"] == "pillow+pillow"
    server = app.state.images
    assert server.renderer == Renderer("pillow", "pillow")
    assert server.jpeg(pool[0]) != server.jpeg(pool[0])


def test_health_reports_the_cache_filling_as_photos_are_served(pool):
    app = create_app(pool, make_safeguard("none"), GENEROUS)
    client = TestClient(app)
    for url in new_challenge(client)["images"]:
        client.get(url)
    cache = client.get("/healthz").json()["image_cache"]
    assert cache["entries"] == 12 and 0 < cache["bytes"] <= cache["limit"] == 256 * 2**20


def test_a_photo_that_breaks_and_has_no_readable_substitute_raises_unusable(pool):
    server = ImageServer(pool, GENEROUS)
    for ref in pool:
        open(ref.source, "wb").write(b"gone")
    with pytest.raises(UnusableImage):
        server.jpeg(pool[0])


def test_bad_cache_and_renderer_settings_are_refused():
    with pytest.raises(ServiceError, match="image_cache_mb must be 0 or more"):
        ServiceSettings(image_cache_mb=-1)
    with pytest.raises(ServiceError, match="unknown renderer 'gpu'; choose auto, pillow"):
        ServiceSettings(renderer="gpu")


def test_the_serving_stack_is_named_as_it_will_run():
    from asirra.captcha.service.run import serving_stack

    stack = serving_stack(ServiceSettings())
    assert stack["event_loop"] in ("uvloop", "asyncio") and stack["http_parser"] in ("httptools", "h11")
    assert stack["renderer"] in ("opencv+simplejpeg", "opencv+pillow", "pillow+simplejpeg", "pillow+pillow")
    assert serving_stack(ServiceSettings(renderer="pillow"))["renderer"] == "pillow+pillow"
