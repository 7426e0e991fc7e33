"""`python -m asirra ...` is the `asirra` command (torchrun starts `--nproc` training ranks this way)."""

from asirra.cli import main

main()
