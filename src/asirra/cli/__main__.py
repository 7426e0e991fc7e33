"""`python -m asirra.cli ...`, the older spelling of `python -m asirra ...`."""

from asirra.cli import main

main()
