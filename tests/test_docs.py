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


def test_export_help_names_a_parquet_install_that_works_from_a_clone():
    from affextract.cli import app

    text = _help(app, "export")
    assert 'pip install -e ".[parquet]"' in text and "affextract[parquet]" not in text  # (not on PyPI)


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


# --- The documentation set: links, anchors, size of the front door, quoted commands and flags, the API block. ---

ROOT = README.parent
README_MAX_LINES = 300


def _doc_files() -> list[Path]:
    return [README, ROOT / "CHANGELOG.md", ROOT / "affextract" / "weights" / "mma_ferplus_small.md",
            *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks" / "results").glob("*.md"))]


def _without_code(text: str) -> str:
    """Markdown with fenced code blocks blanked (links and headings inside them are not links or headings)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _without_code(path.read_text()), flags=re.M):
        a = github_anchor(heading)
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """Relative links of a markdown file whose file or #anchor does not exist, as 'file: target (why)'."""
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and (dest.is_dir() or dest.suffix != ".md" or anchor not in _anchors(dest)):
            bad.append(f"{path.relative_to(ROOT)}: {target} (no such anchor)")
    return bad


def test_every_relative_link_and_anchor_resolves():
    files = _doc_files()
    assert len(files) >= 10, files
    bad = [b for f in files for b in broken_links(f)]
    assert not bad, "\n".join(bad)


def test_link_check_catches_a_missing_file_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Sub: part (x)\n\n[ok](#sub-part-x) [ok](a.md#title)\n"
                                   "[bad](#nope) [bad](b.md) [bad](a.md#sub)\n```\n[in code](#ignored)\n```\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        bad = broken_links(tmp_path / "a.md")
    finally:
        ROOT = old
    assert bad == ["a.md: #nope (no such anchor)", "a.md: b.md (no such file)", "a.md: a.md#sub (no such anchor)"]


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    ci = README.read_text().split("<!-- ci:begin -->")[1].split("<!-- ci:end -->")[0]
    assert 'pip install "torch==2.13.0" -e ".[test,ray]"' in ci and "python -m pytest -q" in ci


def _code(text: str) -> list[str]:
    """Shell-like lines quoted in a markdown file: fenced blocks (not python), indented blocks, inline code."""
    lines = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        if lang != "python":
            lines += body.replace("\\\n", " ").splitlines()
    prose = _without_code(text)
    indented = re.findall(r"(?:^(?: {4}).*\n?)+", prose, flags=re.M)
    lines += [ln for block in indented for ln in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`([^`\n]+)`", prose)
    return lines


# A call starts the line or span, or follows `-m` (python/torchrun) or a shell separator; "this affextract reads"
# in an error message is prose.
CALL = re.compile(r"(?:^\s*|-m\s+|[;&|]\s*)(affextract|seqhead)(?:\.cli)? +([a-z][a-z-]*)(?=\s|$)(.*)")


def quoted_calls(text: str) -> list[tuple[str, str, list[str]]]:
    """(tool, command, flags) of every `affextract CMD ...` / `seqhead CMD ...` quoted in code."""
    calls = []
    for line in _code(text):
        for m in CALL.finditer(line):
            rest = re.split(r"\s#|\||;|&&", m.group(3))[0]
            calls.append((m.group(1), m.group(2), re.findall(r"(?<!\S)(--[a-z][\w-]*|-[a-zA-Z])(?=[\s=]|$)", rest)))
    return calls


def unknown_calls(text: str) -> list[str]:
    import typer.main

    from affextract.cli import app as a_app
    from seqhead.cli import app as s_app

    groups = {"affextract": typer.main.get_command(a_app), "seqhead": typer.main.get_command(s_app)}
    bad = []
    for tool, cmd, flags in quoted_calls(text):
        command = groups[tool].commands.get(cmd)
        if command is None:
            bad.append(f"{tool} {cmd}: no such command")
            continue
        known = {"--help"} | {o for p in command.params for o in [*p.opts, *p.secondary_opts]}
        bad += [f"{tool} {cmd} {flag}: no such option" for flag in flags if flag not in known]
    return bad


def test_every_quoted_command_and_flag_exists():
    calls = [c for f in _doc_files() for c in quoted_calls(f.read_text())]
    assert len(calls) > 50, len(calls)  # the parser still finds the quoted commands
    bad = [f"{f.relative_to(ROOT)}: {b}" for f in _doc_files() for b in unknown_calls(f.read_text())]
    assert not bad, "\n".join(sorted(set(bad)))


def test_flag_check_catches_a_made_up_flag_and_command():
    text = ("```\naffextract run videos/ out.h5 --fps 5 --made-up-flag   # comment --ignored\n```\n"
            "Inline: `seqhead predict runs/x out.h5 -o p.csv`, `affextract frobnicate x`.\n"
            "    torchrun --nproc-per-node 4 -m affextract.cli train --data a \\\n        --no-such-option\n")
    assert sorted(unknown_calls(text)) == ["affextract frobnicate: no such command",
                                           "affextract run --made-up-flag: no such option",
                                           "affextract train --no-such-option: no such option"]


def test_readme_python_api_block_runs_as_written(tmp_path, monkeypatch):
    """The README's Python API block, unchanged, in a folder laid out as its first line says: videos/ + labels.csv."""
    import numpy as np

    from conftest import astronaut_frames, write_video

    block = README.read_text().split("\n## Python API\n")[1].split("```python\n")[1].split("```")[0]
    videos = tmp_path / "videos"
    videos.mkdir()
    frames = astronaut_frames(24)
    for i in range(8):  # 8 real-face clips of 1 s; at the block's fps=5, 5 analysed frames each
        write_video(videos / f"clip{i}.mp4", frames[i * 2:i * 2 + 10], fps=10.0)
    rng = np.random.default_rng(0)
    (tmp_path / "labels.csv").write_text("id,score\n" + "".join(f"clip{i},{rng.random():.3f}\n" for i in range(8)))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md (Python API)", "exec"), namespace)
    assert len(namespace["report"].written) == 8
    assert (tmp_path / "timeline.png").stat().st_size > 0 and (tmp_path / "frames.csv").exists()
    assert len(namespace["pred"].table) == 8
