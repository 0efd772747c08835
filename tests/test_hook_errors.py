"""A user's hook (--eval, --data, a pipeline's data function) that raises: a real `splice` process prints the
user's own traceback, then exactly one `error:` line naming the hook, and exits 2."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import splice
from splice.adapters.extract import extract_patch_to

from conftest import perturbed, save, tiny_model

SPLICE = [sys.executable, "-m", "splice"]
ENV = {**os.environ, "PYTHONPATH": str(Path(splice.__file__).parents[1]), "COLUMNS": "200"}

FAILING_HOOK = textwrap.dedent("""
    import torch


    def _check(value):
        raise ValueError(f"held-out set is empty ({value})")


    def score(state):
        return _check(len(state))


    def batch(model_dir=None):
        return _check(0)


    def fine(state):
        return 1.0
""")


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*SPLICE, *map(str, args)], capture_output=True, text=True, timeout=180, env=ENV)


def assert_user_traceback_then_one_error(result: subprocess.CompletedProcess, hook_file: Path, error: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.rstrip("\n").splitlines()
    lines = lines[lines.index("Traceback (most recent call last):") :]  # after the progress bar, if one was drawn
    assert lines[-1] == error, result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1
    # the user's frames, down to the raise; splice's wrapper is not among them
    assert f'File "{hook_file}"' in lines[1]
    assert '    raise ValueError(f"held-out set is empty ({value})")' in lines
    assert lines[-2].startswith("ValueError: held-out set is empty")
    assert "splice/hooks.py" not in result.stderr and "importlib" not in result.stderr


def test_greedy_soup_eval_that_raises(make_models, tmp_path):
    dirs = make_models("llama", 2)
    hook = tmp_path / "my_eval.py"
    hook.write_text(FAILING_HOOK)
    count = len(splice.Checkpoint.open(str(dirs[0])).tensors)
    result = run("soup", *dirs, "--out", tmp_path / "soup", "--greedy", "--eval", f"{hook}:score", "--device", "cpu")
    assert_user_traceback_then_one_error(
        result, hook, f"error: --eval {hook}:score raised ValueError: held-out set is empty ({count})"
    )
    assert not (tmp_path / "soup").exists()


def test_port_eval_that_raises(tmp_path):
    base = tiny_model("llama", 0)
    v1, tuned = save(base, tmp_path / "v1", False), save(perturbed(base, 1, 0.05), tmp_path / "tuned", False)
    v2 = save(perturbed(base, 7, 0.002), tmp_path / "v2", False)
    extract_patch_to(tmp_path / "patch", v1, tuned, "delta")
    hook = tmp_path / "my_eval.py"
    hook.write_text(FAILING_HOOK)
    count = len(splice.Checkpoint.open(str(v2)).tensors)
    result = run(
        "port",
        tmp_path / "patch",
        "--to",
        v2,
        "--as-patch",
        tmp_path / "ported",
        "--eval",
        f"{hook}:score",
        "--device",
        "cpu",
    )
    assert_user_traceback_then_one_error(
        result, hook, f"error: --eval {hook}:score raised ValueError: held-out set is empty ({count})"
    )


def test_fuse_data_that_raises(tmp_path):
    torch.manual_seed(0)
    a = save(tiny_model("bert", 0), tmp_path / "a", False)
    b = save(tiny_model("bert", 1), tmp_path / "b", False)
    hook = tmp_path / "my_data.py"
    hook.write_text(FAILING_HOOK)
    result = run("fuse", a, b, "--out", tmp_path / "fused", "--data", f"{hook}:batch", "--device", "cpu")
    assert_user_traceback_then_one_error(
        result, hook, f"error: --data {hook}:batch raised ValueError: held-out set is empty (0)"
    )
    assert not (tmp_path / "fused").exists()


def test_a_hook_module_that_fails_while_loading(make_models, tmp_path):
    dirs = make_models("llama", 2)
    hook = tmp_path / "broken_eval.py"
    hook.write_text("def score(state):\n    return 1.0\n\n\nTHRESHOLD = 1 / 0\n")
    result = run("soup", *dirs, "--out", tmp_path / "soup", "--greedy", "--eval", f"{hook}:score")
    assert result.returncode == 2
    lines = result.stderr.rstrip("\n").splitlines()
    assert lines[0] == "Traceback (most recent call last):" and f'File "{hook}", line 5' in lines[1], result.stderr
    assert lines[-1] == (f"error: --eval {hook}:score (loading {hook}) raised ZeroDivisionError: division by zero")
    assert "importlib" not in result.stderr


def test_a_hook_whose_package_fails_while_loading(make_models, tmp_path):
    """MODULE:FUNCTION inside a package whose __init__ raises (found while looking the module up): the user's
    traceback and one error line, as for a module that raises itself (before: splice's own traceback)."""
    dirs = make_models("llama", 2)
    package = tmp_path / "hooks_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("SETTING = {}['missing']\n")
    (package / "scores.py").write_text("def score(state):\n    return 1.0\n")
    result = subprocess.run(
        [
            *SPLICE,
            "soup",
            *map(str, dirs),
            "--out",
            str(tmp_path / "soup"),
            "--greedy",
            "--eval",
            "hooks_pkg.scores:score",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**ENV, "PYTHONPATH": f"{ENV['PYTHONPATH']}{os.pathsep}{tmp_path}"},
    )
    assert result.returncode == 2
    lines = result.stderr.rstrip("\n").splitlines()
    assert lines[0] == "Traceback (most recent call last):", result.stderr
    assert f'File "{package / "__init__.py"}", line 1' in result.stderr
    assert lines[-1] == ("error: --eval hooks_pkg.scores:score (importing hooks_pkg.scores) raised KeyError: 'missing'")
    assert not (tmp_path / "soup").exists()


def test_a_missing_module_is_still_one_line(make_models, tmp_path):
    dirs = make_models("llama", 2)
    result = run("soup", *dirs, "--out", tmp_path / "soup", "--greedy", "--eval", "no_such_module_here:score")
    assert result.returncode == 2
    assert result.stderr == (
        "error: --eval 'no_such_module_here:score': cannot import no_such_module_here "
        "(No module named 'no_such_module_here')\n"
    )


def test_a_pipeline_data_hook_that_raises(tmp_path):
    base = save(tiny_model("vit", 0), tmp_path / "vit", False)
    hook = tmp_path / "my_data.py"
    hook.write_text(FAILING_HOOK)
    pipeline = tmp_path / "cl.yaml"
    pipeline.write_text(
        f"base: {base}\nname: cl\nregistry: {tmp_path / 'registry'}\ntasks:\n  - {{name: t0, data: my_data.py:batch}}\n"
    )
    result = run("continual", "run", pipeline, "--report", tmp_path / "report")
    assert_user_traceback_then_one_error(
        result, hook, f"error: task t0: data {hook}:batch raised ValueError: held-out set is empty (0)"
    )
    assert not (tmp_path / "registry").exists() and not (tmp_path / "report").exists()
