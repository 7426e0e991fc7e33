"""Asirra-style CAPTCHAs, in layers; each may import the ones above it in this list, never one below.

- the rules, shared by all: `challenge` (twelve photos, the answer, mistakes; the one CAPTCHA module
  the core may import), `rendering` (what the service does to a served photo, in PIL and in torch),
  `safeguards` (verdict policies such as the token bucket);
- `service`: the live FastAPI service, its settings, stores (memory, Redis), clients and sites;
- `defend`: the defender's derived pools (adversarially hardened or distorted) and their SSIM;
- `attack`: what a bot runs against a live service (the HTTP bot and its counter-moves); it may use
  the defend layer's published methods (an attacker knows the method, not the defender's models);
- `experiments`: simulations, the safeguard grid, the attacker ladder and the hardening study:
  the only layer that trains models or serves a service to measure it.

Neither `defend` nor `attack` imports `service`; tests/test_structure.py holds these rules.
"""
