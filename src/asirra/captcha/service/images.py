"""Pool photo -> served JPEG, at the cost of an encode: each photo is decoded once into a bounded cache.

A served copy costs what the libraries allow: the photo's decoded base array comes from memory
(`ImageCache`, bounded by `ServiceSettings.image_cache_mb`, least recently used out), and each serving
draws a fresh jitter, crops, resizes and encodes it (asirra.captcha.rendering.Renderer). Encoded bytes are
never cached: no two servings of a photo are byte-identical, so the lookup attack gets no easier.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np

from asirra.captcha.rendering import Renderer, base_side, draw_jitter, to_base
from asirra.images import UnusableImage

log = logging.getLogger(__name__)

ENTRY_OVERHEAD = 200  # bytes a cached array costs beside its pixels (ndarray header, dict slot), measured


class ImageCache:
    """Decoded base arrays by pool source, at most `limit_bytes` of them (pixels + ENTRY_OVERHEAD each);
    the least recently served go first. Thread-safe: misses fill it from the thread pool."""

    def __init__(self, limit_bytes: int):
        self.limit = int(limit_bytes)
        self.bytes = self.hits = self.misses = 0
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            pixels = self._items.get(key)
            if pixels is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return pixels

    def put(self, key: str, pixels: np.ndarray) -> None:
        size = pixels.nbytes + ENTRY_OVERHEAD
        if size > self.limit:
            return  # a cache of 0 MB, or a photo larger than the whole cache: serve it uncached
        pixels.setflags(write=False)  # shared by every serving: nothing may draw on it
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes + ENTRY_OVERHEAD
            self._items[key] = pixels
            self.bytes += size
            while self.bytes > self.limit:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.nbytes + ENTRY_OVERHEAD

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.bytes, "limit": self.limit, "hits": self.hits,
                    "misses": self.misses}


class ImageServer:
    """Pool image -> served JPEG. A pool image that has become unreadable since it was cached (or startup)
    is replaced by another of the same label, which keeps the challenge's answer true."""

    ATTEMPTS = 5

    def __init__(self, pool: Sequence, settings, renderer: Renderer | None = None):
        self._render_settings = settings.rendering
        self.renderer = renderer or renderer_for(settings.renderer)
        self.cache = ImageCache(int(settings.image_cache_mb * 2**20))
        self._rng = random.SystemRandom()  # jitter an attacker cannot replay
        self._by_label: dict[int, list] = {}
        for ref in pool:
            self._by_label.setdefault(ref.label, []).append(ref)

    def cached_jpeg(self, ref) -> bytes | None:
        """A fresh copy of `ref` if its pixels are cached (~0.15 ms: cheap enough for the event loop), else None."""
        base = self.cache.get(ref.source)
        return None if base is None else self._render(base)

    def jpeg(self, ref) -> bytes:
        """A fresh copy of `ref` (or of a same-label substitute), decoding and caching it if need be.
        Raises UnusableImage when neither it nor any substitute reads."""
        for candidate in self._candidates(ref):
            base = self.cache.get(candidate.source) if candidate is not ref else None
            if base is None:
                try:
                    base = self.base(candidate)
                except UnusableImage as exc:
                    log.warning("pool image unreadable while serving: %s", exc)
                    continue
            return self._render(base)
        raise UnusableImage("neither this pool image nor any of its label reads")

    def base(self, ref) -> np.ndarray:
        """`ref` decoded at the base size, and cached."""
        # Decoding may use DCT scaling down to the base size (both sides >= it, as draft keeps them).
        pixels = to_base(ref.load(draft_size=base_side(self._render_settings)), self._render_settings)
        self.cache.put(ref.source, pixels)
        return pixels

    def _render(self, base: np.ndarray) -> bytes:
        return self.renderer.jpeg(base, draw_jitter(self._rng, self._render_settings))

    def _candidates(self, ref) -> Iterator:
        """`ref`, then (only if it fails) up to ATTEMPTS other images of its label."""
        yield ref
        same_label = self._by_label[ref.label]
        picks = self._rng.sample(same_label, min(self.ATTEMPTS + 1, len(same_label)))
        yield from [pick for pick in picks if pick is not ref][: self.ATTEMPTS]


def renderer_for(name: str) -> Renderer:
    """The Renderer a `ServiceSettings.renderer` name means: "auto" the fastest installed, "pillow" Pillow only."""
    return Renderer("pillow", "pillow") if name == "pillow" else Renderer.fastest()
