"""`.ci/run`, as CI runs it: README's ci block in a venv of its own, made afresh for every run and removed after."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_in_a_fresh_venv_removed_after(tmp_path):
    if shutil.which("python3") is None:
        pytest.skip("python3 is not on PATH")
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    # A README whose ci block records the venv it runs in.
    (repo / "README.md").write_text('<!-- ci:begin -->\n```\npython -c "import sys; print(sys.prefix)" > prefix\n'
                                    '```\n<!-- ci:end -->\n')
    env = os.environ | {"PIP_NO_INDEX": "1", "TMPDIR": str(tmp_path)}  # pip's self-upgrade stays offline
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run(["bash", ".ci/run"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    venv = Path((repo / "prefix").read_text().strip())
    # Made for this run (under TMPDIR) and gone after it: no later run can start from what this one installed.
    assert venv.parent == tmp_path and venv.name.startswith("ci-venv.") and not venv.exists()
