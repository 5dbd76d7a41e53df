"""`python -m veobatch` is the same as the `veobatch` command."""

from ._entry import main

main()
