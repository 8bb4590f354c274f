"""What the help texts and the README say agrees with what the tools do."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

README = Path(__file__).resolve().parent.parent / "README.md"
runner = CliRunner()


def _help(app, *args) -> str:
    result = runner.invoke(app, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_export_help_names_the_parquet_extra():
    from affextract.cli import app

    assert 'pip install "affextract[parquet]"' in _help(app, "export")


def test_seqhead_evaluate_help_offers_only_its_own_options():
    from seqhead.cli import app

    text = _help(app, "evaluate")
    for option in re.findall(r"--[a-z][a-z-]+", text):
        assert option in ("--labels", "--id-column", "--split", "--split-column", "--help"), option


def test_readme_quick_start_names_the_default_head():
    from seqhead.train import TrainOptions

    quick = README.read_text().split("### 4. Train a sequence head")[1].split("###")[0]
    named = re.search(r"`(\w+)`\s+\(default\)", quick)
    assert named and named.group(1) == TrainOptions.head
