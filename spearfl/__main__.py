"""`python -m spearfl` is the `spearfl` command."""

from spearfl.cli import main

main()
