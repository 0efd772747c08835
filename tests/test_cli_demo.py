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
    done = subprocess.run(
        [str(SPLICE), "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "uniform soup of 4" in done.stdout and "greedy soup of" in done.stdout
    assert "Nothing was left behind" in done.stdout
    assert "digits-ln@1" in done.stdout and "digits-lora@1" in done.stdout and "verified" in done.stdout
    text = " ".join(done.stdout.split())  # rich wraps long lines
    difference = float(text.split("differ from the fine-tune's by at most ")[1].split()[0])
    assert difference < 1e-4
    assert "Deploying onto a different base (a soup ingredient) was refused, and nothing was written" in text
    assert "not the base this layernorm patch was made for" in text
    # importing transformers' models makes torch create its shared compile cache (torchinductor_<user>) in
    # TMPDIR; that is torch's, reused by every torch program, not something the demo wrote
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]
    assert left == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
