"""The defender's pools: photos hardened against classifiers (`harden`) or randomly distorted
(`distort`), written resumably with their similarity to the originals (`derived_pool`, `similarity`).

May import the CAPTCHA's rules (rendering above all: the service's transform is what hardening
differentiates through) and the core (models, images); never the service, the attacker or the
experiments.
"""
