"""The front door's exits, through a real `splice` process against the installed typer: usage errors are one
line and exit 2, help and --version exit 0, Ctrl-C says nothing was published and exits 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import splice

from helpers import wait_for_marker

SPLICE = [sys.executable, "-m", "splice"]
ENV = {**os.environ, "PYTHONPATH": str(Path(splice.__file__).parents[1]), "COLUMNS": "200"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SPLICE, *args], capture_output=True, text=True, timeout=120, env=ENV)


@pytest.mark.parametrize(
    "args, needles",
    [
        ([], ["missing command", "soup", "registry", "--help"]),
        (["soup", "a", "b"], ["Missing option '--out'", "splice soup --help"]),
        (["soupp"], ["No such command 'soupp'", "Did you mean 'soup'?"]),
        (["registry"], ["missing command", "push", "pull"]),
        (["patch", "extract", "--bogus"], ["No such option: --bogus"]),
        (["soup", "a", "--out", "x", "--devic", "cpu"], ["--devic", "--device"]),
    ],
    ids=["nothing", "missing_out", "typo", "registry_alone", "unknown_option", "option_typo"],
)
def test_usage_errors_are_one_line_and_exit_2(args, needles):
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_exits_0(flag):
    result = run(flag)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "soup" in result.stdout and result.stderr == ""
    sub = run("soup", flag)
    assert sub.returncode == 0 and "--weights" in sub.stdout


def test_version():
    result = run("--version")
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, f"splice {splice.__version__}", "")


# Reads slowed down, and a marker once the first tensor has been read, so the signal lands mid-run.
SLOW_CLI = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from splice.tensors.checkpoint import Checkpoint

    marker = Path(sys.argv[1])
    read = Checkpoint.read

    def slow_read(self, *args, **kwargs):
        marker.touch()
        time.sleep(0.05)
        return read(self, *args, **kwargs)

    Checkpoint.read = slow_read
    sys.argv = ["splice", *sys.argv[2:]]
    from splice.cli.app import main
    main()
""")


def ctrl_c_at_marker(script: Path, source: str, args: list, pause: float = 0.0) -> subprocess.CompletedProcess:
    """`source` (a splice entry that touches the marker file it is given at the moment of interest) run as
    `script ARGS`; SIGINT once the marker exists (after `pause`), then its exit code and output."""
    script.write_text(source)
    marker = script.with_suffix(".marker")
    marker.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, str(script), str(marker), *map(str, args)],
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_marker(process, marker)
        time.sleep(pause)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def interrupted(tmp_path: Path, args: list[str], out: Path) -> subprocess.CompletedProcess:
    result = ctrl_c_at_marker(tmp_path / "slow_cli.py", SLOW_CLI, args, pause=0.2)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []
    return result


def test_ctrl_c_during_merge_exits_130_and_publishes_nothing(make_models, tmp_path):
    base, first, second = make_models("bert", 3)
    recipe = tmp_path / "ta.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(base),
                "models": [
                    {"model": str(first), "parameters": {"weight": 0.5}},
                    {"model": str(second), "parameters": {"weight": 0.5}},
                ],
            }
        )
    )
    out = tmp_path / "outputs" / "merged"
    out.parent.mkdir()
    result = interrupted(tmp_path, ["merge", recipe, "--out", out, "--device", "cpu", "--quiet"], out)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted; nothing was published"
    assert "Traceback" not in result.stderr


def test_ctrl_c_during_patch_extract_exits_130(make_models, tmp_path):
    base, tuned = make_models("bert", 2)
    out = tmp_path / "outputs" / "patch"
    out.parent.mkdir()
    result = interrupted(
        tmp_path,
        [
            "patch",
            "extract",
            "--base",
            base,
            "--tuned",
            tuned,
            "--kind",
            "lora",
            "--rank",
            "2",
            "--out",
            out,
            "--device",
            "cpu",
        ],
        out,
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted; nothing was published"
    assert "Traceback" not in result.stderr


# A marker as the first table is drawn (the command's library call has returned), then a pause for the signal.
AT_THE_TABLE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from splice.cli import render

    marker = Path(sys.argv[1])
    table = render.table

    def slow_table(*args, **kwargs):
        marker.touch()
        time.sleep(30)
        return table(*args, **kwargs)

    render.table = slow_table
    sys.argv = ["splice", *sys.argv[2:]]
    from splice.cli.app import main
    main()
""")


def test_ctrl_c_after_the_output_was_published_says_so(make_models, tmp_path):
    """A Ctrl-C while the result table is drawn lands after the output or the registry version exists: the
    message names what was published instead of saying nothing was."""
    from test_registry import make_patch

    from splice.registry import Registry

    first, second = make_models("bert", 2)
    out = tmp_path / "soup"
    registry = tmp_path / "registry"
    Registry.init(registry)
    make_patch(61).save(tmp_path / "patch")
    commands = {
        f"{out.absolute()} was published": ["soup", first, second, "--out", out, "--device", "cpu"],
        "x@1 was published": ["registry", "push", "x", tmp_path / "patch", "--registry", registry],
    }
    for said, args in commands.items():
        result = ctrl_c_at_marker(tmp_path / "at_the_table.py", AT_THE_TABLE, args)
        assert result.returncode == 130, result.stderr
        assert result.stderr.strip().splitlines()[-1] == f"interrupted after {said}", result.stderr
    assert (out / "config.json").exists() and Registry.open(registry).resolve("x@1").version == 1


def two_linear_stages(path: Path, first: Path, second: Path, third: Path) -> Path:
    """A two-stage recipe file: stage s1 averages `first` and `second`, the final stage averages s1 and `third`."""
    stages = [
        {"name": "s1", "merge_method": "linear", "models": [str(first), str(second)]},
        {"merge_method": "linear", "models": ["s1", str(third)]},
    ]
    for stage in stages:
        stage["models"] = [{"model": model, "parameters": {"weight": 0.5}} for model in stage["models"]]
    path.write_text(yaml.safe_dump_all(stages))
    return path


def refused_in_one_line(cases: dict[tuple, str], tmp_path: Path) -> None:
    """Each command (args -> a needle of its error) exits 2 with one `error:` line, and writes neither output `a`
    nor `b` under `tmp_path` (nor a hidden staging directory of theirs)."""
    for args, needle in cases.items():
        result = run(*map(str, args))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.lstrip(".").split(".")[0] in ("a", "b")]


def test_new_merge_commands_refuse_bad_input_in_one_line(make_models, tmp_path):
    """`splice patch merge` and a multi-stage `splice merge` through a real process: a bad method, a stage that is
    not in the file."""
    base, tuned = make_models("bert", 2)
    splice.extract_patch(base, tuned, "delta").save(tmp_path / "patch")
    stages = two_linear_stages(tmp_path / "stages.yml", base, tuned, base)
    cases = {
        ("patch", "merge", tmp_path / "patch", "--method", "slerp", "--out", tmp_path / "a"): "slerp interpolates",
        ("merge", stages, "--out", tmp_path / "b", "--stage", "s2"): "s2",
    }
    refused_in_one_line(cases, tmp_path)


def test_ctrl_c_during_a_patch_merge_and_a_stage_exits_130_and_publishes_nothing(make_models, tmp_path):
    base, first, second = make_models("bert", 3)
    for name, tuned in (("p1", first), ("p2", second)):
        splice.extract_patch(base, tuned, "delta").save(tmp_path / name)
    stages = two_linear_stages(tmp_path / "stages.yml", base, first, second)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    commands = {
        outputs / "patch": [
            "patch",
            "merge",
            tmp_path / "p1",
            tmp_path / "p2",
            "--method",
            "task_arithmetic",
            "--base",
            base,
            "--out",
            outputs / "patch",
            "--quiet",
        ],
        outputs / "staged": ["merge", stages, "--out", outputs / "staged", "--device", "cpu", "--quiet"],
    }
    for out, args in commands.items():
        result = interrupted(tmp_path, args, out)
        assert result.returncode == 130, result.stderr
        assert result.stderr.strip().splitlines()[-1] == "interrupted; nothing was published", result.stderr
        assert "Traceback" not in result.stderr
    # the interrupted stage left no entry a rerun would trust: the stage cache holds no s1 with its key
    assert not (outputs / "staged.stages" / "s1" / "splice_stage.json").exists()


def _regmean_recipe(path: Path, models: list[Path], stats: list[Path]) -> Path:
    entries = [{"model": str(model), "stats": str(where)} for model, where in zip(models, stats)]
    path.write_text(yaml.safe_dump({"merge_method": "regmean", "models": entries}))
    return path


def test_stats_collect_and_a_regmean_merge_refuse_bad_input_and_ctrl_c_publishes_nothing(make_models, tmp_path):
    """`splice stats collect` and a regmean `splice merge` through a real process: bad input is one line (exit 2),
    nothing written; Ctrl-C mid-run exits 130 and leaves no output nor staging behind."""
    from splice import collect_stats

    models = make_models("bert", 2)
    hook = "import torch\n\ndef batch():\n    return {'input_ids': torch.arange(40).reshape(4, 10) % 64}\n"
    (tmp_path / "hook.py").write_text(hook)
    data = f"{tmp_path / 'hook.py'}:batch"
    grams = [collect_stats(m, data, kind="gram", out=tmp_path / f"{m.name}.gram").out for m in models]
    crossed = _regmean_recipe(tmp_path / "crossed.yml", models, [grams[0], grams[0]])
    cases = {
        ("stats", "collect", models[0], "--data", data, "--kind", "hessian", "--out", tmp_path / "a"): "--kind hessian",
        ("stats", "collect", models[0], "--data", data, "--kind", "gram"): "--out DIR",
        ("merge", crossed, "--out", tmp_path / "b"): "were collected on another model",
    }
    refused_in_one_line(cases, tmp_path)

    recipe = _regmean_recipe(tmp_path / "regmean.yml", models, grams)
    out = tmp_path / "outputs" / "merged"
    out.parent.mkdir()
    result = interrupted(tmp_path, ["merge", recipe, "--out", out, "--device", "cpu", "--quiet"], out)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted; nothing was published"
    stats_out = tmp_path / "outputs" / "fisher"
    args = ["stats", "collect", models[0], "--data", data, "--kind", "fisher", "--out", stats_out, "--quiet"]
    result = interrupted(tmp_path, args, stats_out)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted; nothing was published"
    assert "Traceback" not in result.stderr
