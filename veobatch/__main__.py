"""`python -m veobatch` is the same as the `veobatch` command."""

from .cli import main

main()
