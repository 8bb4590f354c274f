"""`python -m seqhead …` runs the command line."""

from seqhead.cli import app

app(prog_name="seqhead")
