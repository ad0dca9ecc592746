"""`python -m spearfl` is the `spearfl` command."""

from spearfl.cli import app

app(prog_name="spearfl")
