from affextract.cli import app

app(prog_name="affextract")
