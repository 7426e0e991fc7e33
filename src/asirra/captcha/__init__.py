"""The CAPTCHA lab's supporting types: service settings, running a service, hardening, attacking,
and the hardening study. (The lab's main functions are top-level: `asirra.create_app`,
`asirra.attack`, `asirra.harden`, `asirra.solve`.)

Public: the names in `asirra.captcha.__all__`, loaded on first use. The subpackages below are
internal, in layers; each may import the ones above it in this list, never one below:

- the rules, shared by all: `challenge` (twelve photos, the answer, mistakes; the one CAPTCHA module
  the core may import), `rendering` (what the service does to a served photo, in PIL and in torch),
  `safeguards` (verdict policies such as the token bucket);
- `service`: the live FastAPI service, its settings, stores (memory, Redis), clients and sites;
- `defend`: the defender's derived pools (adversarially hardened or distorted) and their SSIM;
- `attack`: what a bot runs against a live service (the HTTP bot and its counter-moves); it may use
  the defend layer's published methods (an attacker knows the method, not the defender's models);
- `experiments`: simulations, the safeguard grid, the attacker ladder and the hardening study:
  the only layer that trains models or serves a service to measure it.

Neither `defend` nor `attack` imports `service`; tests/test_structure.py holds these rules. This
file imports nothing at load time, so `import asirra.captcha.attack.bot` stays light.

Examples:
    >>> import asirra
    >>> from asirra.captcha import ServiceSettings, running
    >>> app = asirra.create_app("data/dogs-vs-cats/train", limit=200, settings=ServiceSettings(challenge_rate=100))
    >>> with running(app) as url:
    ...     print(asirra.attack(url, 30).solve_rate)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and the API reference see; at run time __getattr__ loads them
    from asirra.api import make_pool, study
    from asirra.captcha.attack.bot import AttackReport
    from asirra.captcha.defend.config import HardenConfig
    from asirra.captcha.defend.derived_pool import DerivedPoolSummary
    from asirra.captcha.experiments.study import StudyConfig, StudyResult
    from asirra.captcha.service.run import running, serve
    from asirra.captcha.service.settings import ServiceSettings

__all__ = ["ServiceSettings", "running", "serve", "HardenConfig", "DerivedPoolSummary", "AttackReport", "make_pool",
           "study", "StudyConfig", "StudyResult"]


def __getattr__(name: str) -> Any:
    if name in ("running", "serve"):  # FastAPI and uvicorn: only when a service is run
        from asirra.captcha.service import run

        value = getattr(run, name)
    elif name in __all__:
        from asirra import api

        value = getattr(api, name)
    else:
        raise AttributeError(f"module 'asirra.captcha' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
