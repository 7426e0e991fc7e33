"""Where the live service keeps its state: `base` (the interface and its refusals), `memory` (one
process), `redis` (any number of workers sharing one Redis)."""

from asirra.captcha.service.store.base import (
                                               KEY_PREFIX,
                                               Closed,
                                               Issued,
                                               Limit,
                                               PassRecord,
                                               Store,
                                               StoreError,
                                               StoreSettings,
                                               Unavailable,
                                               Unknown,
                                               ordered_pool,
                                               pool_fingerprint,
)
from asirra.captcha.service.store.memory import MemoryStore
from asirra.captcha.service.store.redis import PoolMismatch, RedisStore, claim_pool

__all__ = ["KEY_PREFIX", "Closed", "Issued", "Limit", "MemoryStore", "PassRecord", "PoolMismatch", "RedisStore",
           "Store",
           "StoreError", "StoreSettings", "Unavailable", "Unknown", "claim_pool", "ordered_pool", "pool_fingerprint"]
