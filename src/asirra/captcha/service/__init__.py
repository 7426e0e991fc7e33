"""The live CAPTCHA service: the FastAPI app (`app`), its settings (`settings`), where it keeps state
(`store`), who its clients and sites are (`clients`), how it runs (`run`), and a protected example
site (`example_site`).

May import the CAPTCHA's rules (challenge, rendering, safeguards) and the core's image reading;
nothing of the defender's pools, the attacker or the experiments. This file imports nothing, so
`asirra.captcha.service.settings` loads without FastAPI.
"""
