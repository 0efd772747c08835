"""Library errors name the Python parameter (`force=True`, `out`, `old_base`); the command line reads the same
error with its flags (--force, --out, --from), rewritten in one place (splice.cli.flags)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import splice
from splice.cli.flags import FLAGS, with_flags
from splice.errors import OutputExistsError, PatchError, SpliceError, parameter

from helpers import run_cli

SPLICE = Path(splice.__file__).parent


@pytest.mark.parametrize(
    ("message", "said"),
    [
        ("pass `force=True` to replace it", "pass --force to replace it"),
        ("choose another `out`", "choose another --out"),
        ("give the base it was made on (`old_base=OLD_BASE`)", "give the base it was made on (--from OLD_BASE)"),
        ("try `solver='sinkhorn'`", "try --solver sinkhorn"),
        ("`anchor=2` is not a model index", "--anchor 2 is not a model index"),
        ("needs `rank=R`, `energy=E`, or both", "needs --rank R, --energy E, or both"),
        ("`report_dir` x: a file is there", "--report x: a file is there"),
        (
            "`evaluate` scores.py:score raised ValueError: `x` is empty",
            "--eval scores.py:score raised ValueError: `x` is empty",
        ),
        # not parameters in the table: as they are
        ("`tensors` and `modules_to_save`", "`tensors` and `modules_to_save`"),
        ("add `align: null` to the pipeline file", "add `align: null` to the pipeline file"),
        ("run `splice registry tag x@1 prod --force`", "run `splice registry tag x@1 prod --force`"),
        ("--weights '0.5,x': give numbers", "--weights '0.5,x': give numbers"),
    ],
)
def test_with_flags_rewrites_the_parameters_of_its_table_and_nothing_else(message, said):
    assert with_flags(message) == said


def test_what_parameter_writes_is_what_with_flags_reads():
    assert parameter("force", True) == "`force=True`" and with_flags(parameter("force", True)) == "--force"
    assert parameter("out") == "`out`" and with_flags(parameter("out")) == "--out"
    assert with_flags(parameter("old_base", "OLD_BASE")) == "--from OLD_BASE"
    assert with_flags(parameter("device", repr("cpu"))) == "--device cpu"


def _options(command) -> set[str]:
    found = {opt for param in getattr(command, "params", []) for opt in param.opts + param.secondary_opts}
    for sub in getattr(command, "commands", {}).values():
        found |= _options(sub)
    return found


def test_every_flag_in_the_table_is_an_option_of_a_command():
    import typer

    from splice.cli.app import app

    options = _options(typer.main.get_command(app))
    assert sorted(flag for flag in FLAGS.values() if flag not in options) == []


def _raised_text(path: Path) -> list[tuple[int, str]]:
    """The literal text of each `raise` in a module (an f-string's literal parts, joined)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            text = "".join(
                sub.value for sub in ast.walk(node.exc) if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
            )
            found.append((node.lineno, text))
    return found


def test_no_library_error_tells_the_user_to_pass_a_flag():
    """Outside splice/cli, an error names parameters; a whole command to run (`splice registry verify`) may
    carry its own flags."""
    flagged = []
    for path in sorted(SPLICE.rglob("*.py")):
        if path.relative_to(SPLICE).parts[0] == "cli":
            continue
        for line, text in _raised_text(path):
            if re.search(r"(?<![\w-])--[a-z]", re.sub(r"`splice [^`]*`", "", text)):
                flagged.append(f"{path.relative_to(SPLICE)}:{line}: {text}")
    assert flagged == []


def test_an_existing_output_is_out_and_force_to_python_and_flags_on_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "out").mkdir()
    models = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(OutputExistsError) as caught:
        splice.soup(models, tmp_path / "out")
    assert str(caught.value).endswith("choose another `out` or pass `force=True` to replace it")
    code, _, err = run_cli(["soup", *models, "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and err.strip() == (
        f"error: output {tmp_path / 'out'} already exists: choose another --out or pass --force to replace it"
    )


def test_old_base_without_port_is_old_base_to_python_and_from_on_the_command_line(tmp_path, monkeypatch, capsys):
    base, old = str(tmp_path / "base"), str(tmp_path / "old")
    with pytest.raises(PatchError) as caught:
        splice.deploy(["lo"], base, tmp_path / "out", old_base=old)
    assert str(caught.value) == (
        "`old_base` (the base the patches were made on) is for `port=True`; add `port=True` to port them"
    )
    code, _, err = run_cli(
        ["deploy", "lo", "--base", base, "--out", tmp_path / "out", "--from", old], monkeypatch, capsys
    )
    assert code == 2 and err.strip() == (
        "error: --from (the base the patches were made on) is for --port; add --port to port them"
    )


def test_a_port_with_nowhere_to_go_names_its_outputs_as_parameters_and_as_flags(tmp_path, monkeypatch, capsys):
    with pytest.raises(SpliceError) as caught:
        splice.port("p", tmp_path / "new")
    assert "`out=DIR` (the ported model), `as_patch=DIR` (the ported patch) or `push=NAME`" in str(caught.value)
    code, _, err = run_cli(["port", "p", "--to", tmp_path / "new"], monkeypatch, capsys)
    assert code == 2 and "--out DIR (the ported model), --as-patch DIR (the ported patch) or --push NAME" in err
    assert not (tmp_path / "out").exists()
