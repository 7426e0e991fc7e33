"""Asirra-style CAPTCHAs: challenges, safeguard policies, simulated and served attacks."""
