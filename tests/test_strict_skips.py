"""The suite's skip rule (tests/strict_skips.py), run on a small test file in a pytest subprocess: a skip for a
missing module or a server that did not start fails the run; a skip about the machine's GPU does not."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_pytest(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(body))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "strict_skips",
            str(tmp_path / "test_sample.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PYTHONPATH": str(HERE), "PATH": "/usr/bin:/bin"},
    )


def test_a_missing_dependency_or_server_fails_and_a_gpu_skip_does_not(tmp_path):
    failed = run_pytest(
        tmp_path,
        """
        import pytest

        def test_needs_a_module():
            pytest.importorskip("no_such_test_dependency")

        def test_needs_a_server():
            pytest.skip("moto's S3 server could not start on 127.0.0.1")

        def test_on_a_cpu_machine():
            pytest.skip("this machine has a CUDA GPU")

        def test_on_a_gpu_machine():
            pytest.skip("needs a CUDA GPU: this machine has no CUDA GPU")
        """,
    )
    assert failed.returncode == 1, failed.stdout
    assert "2 failed, 2 skipped" in failed.stdout, failed.stdout
    assert (
        "skipped, which this suite does not allow: Skipped: could not import 'no_such_test_dependency'" in failed.stdout
    )
    at_collection = run_pytest(
        tmp_path,
        """
        import pytest

        pytest.importorskip("no_such_test_dependency")

        def test_anything():
            pass
        """,
    )
    assert at_collection.returncode != 0 and "does not allow" in at_collection.stdout, at_collection.stdout
