from seqhead.cli import app

app(prog_name="seqhead")
