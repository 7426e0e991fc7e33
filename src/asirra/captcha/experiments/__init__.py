"""Measuring the CAPTCHA: simulated attacks under safeguards (`simulate`), the safeguard grid
(`defend_grid`), the attacker ladder (`ladder`: builds attackers, training models) and the hardening
study (`study`: plan, run, report).

The top CAPTCHA layer: the only one that trains models or starts a service to measure it.
"""
