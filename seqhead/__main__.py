"""`python -m seqhead …` runs the command line."""

from .cli import app

app()
