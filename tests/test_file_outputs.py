"""Files splice writes outside a model directory (predictions, reports) follow the one output rule: never an input
or inside the registry, --force to replace, a directory refused in one line, published whole (issue 16, item 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_continual import TASK_FILE, pipeline_file, tiny_vit
from test_output_safety import snapshot
from test_port import lineage_setup

from splice.adapters.extract import extract_patch_to
from splice.errors import OutputExistsError
from splice.registry.store import Registry
from splice.tensors.partials import PARTIAL
from splice.tensors.writer import write_output_file
from splice.workflows.continual.run import run_pipeline

from helpers import run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-task pipeline's registry and base, and a data hook in a file of its own."""
    root = tmp_path_factory.mktemp("predict")
    base = tiny_vit(root / "vit")
    registry = root / "registry"
    Registry.init(registry)
    run_pipeline(
        pipeline_file(
            root, base, str(registry), epochs=1, rectify=False, tasks=[{"name": "t0", "data": f"{TASK_FILE}:task_0"}]
        )
    )
    hook = root / "hook.py"
    hook.write_text("from continual_tasks import unlabelled_batch\n\n\ndef batch():\n    return unlabelled_batch()\n")
    return root, base, registry, hook


def predict_args(base: Path, registry: Path, hook: Path, out: Path) -> list:
    return [
        "continual",
        "predict",
        "--bank",
        "cl@task-1",
        "--base",
        base,
        "--data",
        f"{hook}:batch",
        "--registry",
        registry,
        "--device",
        "cpu",
        "--out",
        out,
    ]


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


@pytest.mark.parametrize("force", [False, True])
def test_predict_out_never_replaces_an_input_or_the_registry(trained, force, monkeypatch, capsys):
    root, base, registry, hook = trained
    linked = root / "elsewhere" / "predictions.json"  # a link to an input is that input
    linked.parent.mkdir(exist_ok=True)
    if not linked.is_symlink():
        linked.symlink_to(base / "config.json")
    targets = [
        base / "config.json",
        registry / "patches" / "cl" / "versions" / "1.json",
        registry / "registry.json",
        hook,
        linked,
    ]
    before = snapshot(root)
    for target in targets:
        code, _, err = run_cli(
            [*predict_args(base, registry, hook, target), *(["--force"] if force else [])], monkeypatch, capsys
        )
        line = one_error_line(code, err)
        assert "writing there would destroy it" in line, line
        assert snapshot(root) == before, target
    assert not list(root.rglob(f"*{PARTIAL}*"))
    assert Registry.open(registry).load("cl@1").meta.settings["task"] == 0  # the manifest still reads


def test_predict_out_is_refused_when_it_exists_replaced_with_force_and_a_directory_is_one_line(
    trained, tmp_path, monkeypatch, capsys
):
    _, base, registry, hook = trained
    out = tmp_path / "predictions.json"
    out.write_text("mine\n")
    code, _, err = run_cli(predict_args(base, registry, hook, out), monkeypatch, capsys)
    assert "already exists" in one_error_line(code, err) and "--force" in err
    assert out.read_text() == "mine\n"
    code, _, err = run_cli([*predict_args(base, registry, hook, out), "--force"], monkeypatch, capsys)
    assert code == 0, err
    written = json.loads(out.read_text())
    assert written["bank"] == ["cl@1"] and len(written["classes"]) == len(written["tasks"]) > 0
    (tmp_path / "a-dir").mkdir()
    for force in ([], ["--force"]):
        code, _, err = run_cli([*predict_args(base, registry, hook, tmp_path / "a-dir"), *force], monkeypatch, capsys)
        assert "is a directory" in one_error_line(code, err)
    assert list((tmp_path / "a-dir").iterdir()) == []
    fresh = tmp_path / "new" / "p.json"  # a missing directory is made, as for every --out
    code, _, err = run_cli(predict_args(base, registry, hook, fresh), monkeypatch, capsys)
    assert code == 0 and json.loads(fresh.read_text()) == written, err
    assert not list(tmp_path.rglob(f"*{PARTIAL}*"))


def test_port_report_files_are_refused_unless_force_and_never_land_in_the_registry(tmp_path, monkeypatch, capsys):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama", sharded=False)
    extract_patch_to(tmp_path / "lora", v1, tuned, "lora", rank=2)
    registry = tmp_path / "registry"
    Registry.init(registry).push("lo", tmp_path / "lora")
    report = tmp_path / "report"
    report.mkdir()
    (report / "port_report.json").write_text("earlier\n")
    args = [
        "port",
        tmp_path / "lora",
        "--to",
        v2,
        "--from",
        v1,
        "--as-patch",
        tmp_path / "ported",
        "--report",
        report,
        "-q",
    ]
    code, _, err = run_cli(args, monkeypatch, capsys)
    line = one_error_line(code, err)
    assert "port_report.json already exists" in line and "--force" in line
    assert (report / "port_report.json").read_text() == "earlier\n" and not (tmp_path / "ported").exists()
    code, _, err = run_cli([*args, "--force"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((report / "port_report.json").read_text())["patch"] == str(tmp_path / "lora")
    assert (report / "port_report.png").read_bytes()[:4] == b"\x89PNG"
    before = snapshot(registry)
    for inside in (registry, registry / "patches" / "lo"):
        code, _, err = run_cli(
            [
                "port",
                "lo@1",
                "--to",
                v2,
                "--from",
                v1,
                "--as-patch",
                tmp_path / "p2",
                "--registry",
                registry,
                "--report",
                inside,
                "--force",
                "-q",
            ],
            monkeypatch,
            capsys,
        )
        assert "writing there would destroy it" in one_error_line(code, err)
    assert snapshot(registry) == before and not (tmp_path / "p2").exists()
    assert not list(tmp_path.rglob(f"*{PARTIAL}*"))


def test_continual_report_files_are_refused_before_any_work_unless_force(tmp_path, monkeypatch, capsys):
    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    path = pipeline_file(
        tmp_path, base, str(registry), epochs=1, rectify=False, tasks=[{"name": "t0", "data": f"{TASK_FILE}:task_0"}]
    )
    report = tmp_path / "report"
    report.mkdir()
    (report / "accuracy_matrix.png").write_text("earlier\n")
    code, _, err = run_cli(["continual", "run", path, "--report", report, "-q"], monkeypatch, capsys)
    assert "accuracy_matrix.png already exists" in one_error_line(code, err)
    assert not registry.exists() and (report / "accuracy_matrix.png").read_text() == "earlier\n"  # nothing trained
    code, _, err = run_cli(["continual", "run", path, "--report", base, "-q"], monkeypatch, capsys)
    assert "writing there would destroy it" in one_error_line(code, err)
    code, _, err = run_cli(["continual", "run", path, "--report", report, "--force", "-q"], monkeypatch, capsys)
    assert code == 0, err
    assert (report / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((report / "continual_report.json").read_text())["tasks"] == ["t0"]
    shutil.rmtree(report)
    assert not list(tmp_path.rglob(f"*{PARTIAL}*"))


def test_a_partial_file_of_a_dead_writer_is_removed_and_a_live_ones_kept(tmp_path):
    out = tmp_path / "predictions.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{out.name}{PARTIAL}{int(dead.stdout)}-0badc0de"
    live = tmp_path / f".{out.name}{PARTIAL}{os.getpid()}-0badc0de"
    for partial in (stale, live):
        partial.write_bytes(b"half")
    write_output_file(out, b"whole\n")
    assert out.read_bytes() == b"whole\n" and not stale.exists() and live.read_bytes() == b"half"
    with pytest.raises(OutputExistsError, match="already exists"):
        write_output_file(out, b"again\n")
    write_output_file(out, b"again\n", force=True)
    assert out.read_bytes() == b"again\n" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, live.name]
    )
