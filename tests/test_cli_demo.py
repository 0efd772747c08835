"""`splice demo` runs end to end and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SPLICE = Path(sys.executable).with_name("splice")


def test_demo_runs_and_cleans_up(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "COLUMNS": "120"}
    done = subprocess.run([str(SPLICE), "demo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "uniform soup of 4" in done.stdout and "greedy soup of" in done.stdout
    assert "Nothing was left behind" in done.stdout
    # importing transformers' models makes torch create its shared compile cache (torchinductor_<user>) in
    # TMPDIR; that is torch's, reused by every torch program, not something the demo wrote
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]
    assert left == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
