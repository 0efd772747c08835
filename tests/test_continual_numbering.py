"""Task numbering (aliases task-1 .. task-T, as the run counts its tasks; registries of the older 0-based aliases
still resumed and read), aliases moved onto another task's version, what the run and predict show while they
work, and what Ctrl-C says once tasks are in the registry."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from continual_tasks import TASKS, unlabelled_batch
from test_continual import TASK_FILE, pipeline_file, tiny_vit

from splice.errors import SpliceError
from splice.registry.store import Registry
from splice.workflows.continual.predict import load_bank, predict
from splice.workflows.continual.run import run_pipeline

from helpers import run_cli, wait_for_marker

HERE = Path(__file__).resolve().parent
QUICK = {"epochs": 1, "rectify": False}


def tasks(count: int) -> list[dict]:
    return [{"name": f"t{i}", "data": f"{TASK_FILE}:task_{i}"} for i in range(count)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_vit(tmp_path_factory.mktemp("numbering") / "vit")


def test_tasks_are_numbered_from_1_in_the_progress_the_aliases_and_predict(tmp_path, base, monkeypatch, capsys):
    registry = tmp_path / "registry"
    path = pipeline_file(tmp_path, base, str(registry), **QUICK)
    code, _, err = run_cli(["continual", "run", path, "--report", tmp_path / "report"], monkeypatch, capsys)
    assert code == 0, err
    store = Registry.open(registry)
    aliases = {alias: record.version for alias, record in store.aliases("cl").items()}
    assert aliases == {"task-1": 1, "task-2": 2, "task-3": 3}
    for number in range(1, TASKS + 1):  # the run's "task i/3" is alias task-i and the version's own record
        version = store.load(f"cl@task-{number}")
        assert version.meta.settings["task_name"] == f"t{number - 1}"
        assert version.meta.lineage == [f"continual pipeline cl, task {number}: t{number - 1}"]
        assert f"task {number}/{TASKS} t{number - 1} LayerNorm epoch 1/1" in err
        # the phases after training say what they do (they were 9-16 s of a finished bar on the screen)
        assert f"task {number}/{TASKS} t{number - 1} evaluating {number} task(s)" in err
        assert f"task {number}/{TASKS} t{number - 1} pushing to the registry as cl@task-{number}" in err
    # the user's --bank cl@task-3 of a 3-task pipeline is its last task, with every task's slot
    code, out, err = run_cli(
        [
            "continual",
            "predict",
            "--bank",
            "cl@task-3",
            "--base",
            base,
            "--data",
            f"{TASK_FILE}:unlabelled_batch",
            "--registry",
            registry,
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "checking and loading the base model" in err and "1/1 models" in err
    assert "loading the slots of cl" in err and "3/3 tasks" in err
    assert "routing and predicting" in err and f"{TASKS * 12}/{TASKS * 12} inputs" in err
    routed = predict(load_bank("cl@task-3", base, registry), unlabelled_batch())
    for number in range(1, TASKS + 1):
        count = int((routed.tasks == number - 1).sum())
        if count:
            assert re.search(rf"task-{number}\s.*cl@{number}\s.*\s{count}\s", out), out
    code, out, err = run_cli(
        [
            "continual",
            "predict",
            "--bank",
            "cl@task-2",
            "--base",
            base,
            "--data",
            f"{TASK_FILE}:unlabelled_batch",
            "--registry",
            registry,
            "-q",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0 and out == "" and err == ""  # quiet: no progress, no table
    assert load_bank("cl@task-2", base, registry).refs == ["cl@1", "cl@2"]


def _old_registry(new: Path, old: Path) -> None:
    """`old` as the code before the 1-based numbering wrote it: the same versions, aliased task-0, task-1, ..."""
    source, target = Registry.open(new), Registry.init(old)
    for manifest in source.versions("cl"):
        target.push(
            "cl", source.load(manifest.ref), alias=f"task-{manifest.meta.settings['task']}", message=manifest.message
        )


def test_a_registry_of_the_old_0_based_aliases_resumes_and_predicts(tmp_path, base, monkeypatch, capsys):
    whole = run_pipeline(pipeline_file(tmp_path, base, str(tmp_path / "whole"), **QUICK))
    run_pipeline(pipeline_file(tmp_path, base, str(tmp_path / "two"), tasks=tasks(2), **QUICK))
    _old_registry(tmp_path / "two", tmp_path / "old")
    path = pipeline_file(tmp_path, base, str(tmp_path / "old"), **QUICK)
    code, _, err = run_cli(["continual", "run", path, "--resume", "--report", tmp_path / "report"], monkeypatch, capsys)
    assert code == 0, err
    store = Registry.open(tmp_path / "old")
    # its two tasks taken up as they are, the third pushed in the registry's own numbering
    assert {alias: r.version for alias, r in store.aliases("cl").items()} == {"task-0": 1, "task-1": 2, "task-2": 3}
    resumed = json_report(tmp_path / "report")
    assert resumed["resumed_tasks"] == 2 and resumed["accuracy"] == whole.accuracy
    assert "pushing to the registry as cl@task-2" in err
    final, expected = store.load("cl@task-2").tensors, Registry.open(tmp_path / "whole").load("cl@task-3").tensors
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    # predict reads the old aliases as they were written: task-1 there is the second task
    assert load_bank("cl@task-1", base, store).refs == ["cl@1", "cl@2"]
    assert load_bank("cl@task-0", base, store).classes == [[0, 1]]
    code, out, err = run_cli(
        [
            "continual",
            "predict",
            "--bank",
            "cl@task-2",
            "--base",
            base,
            "--data",
            f"{TASK_FILE}:unlabelled_batch",
            "--registry",
            tmp_path / "old",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "task-0" in out and "task-3" not in out


def json_report(directory: Path) -> dict:
    import json

    return json.loads((directory / "continual_report.json").read_text())


def test_an_alias_moved_onto_another_tasks_version_is_named_not_used(tmp_path, base, monkeypatch, capsys):
    registry = tmp_path / "registry"
    path = pipeline_file(tmp_path, base, str(registry), **QUICK)
    run_pipeline(path)
    Registry.open(registry).tag("cl", "task-2", 3)  # task 2's alias moved onto task 3's version
    message = (
        "alias task-2 of cl points to cl@3, which holds task 3 (t2), not task 2; move it back with "
        "`splice registry tag cl@2 task-2`"
    )
    for ref in ("cl@task-3", "cl@task-2", "cl"):  # before: task 3's slot silently used in task 2's place
        with pytest.raises(SpliceError) as caught:
            load_bank(ref, base, registry)
        assert str(caught.value) == message
    Registry.open(registry).tag("cl", "task-3", 2)  # and task 3's onto task 2's: not a bank of tasks 1-2
    with pytest.raises(
        SpliceError,
        match=r"^alias task-3 of cl points to cl@2, which holds task 2 \(t1\), not task 3; "
        r"move it back with `splice registry tag cl@3 task-3`$",
    ):
        load_bank("cl@task-3", base, registry)
    Registry.open(registry).tag("cl", "task-3", 3)
    code, _, err = run_cli(["continual", "run", path, "--resume"], monkeypatch, capsys)  # before: a traceback
    assert code == 2 and err.strip() == f"error: {message}"
    code, _, err = run_cli(["registry", "tag", "cl@2", "task-2", "--registry", registry], monkeypatch, capsys)
    assert code == 0, err
    assert load_bank("cl@task-3", base, registry).refs == ["cl@1", "cl@2", "cl@3"]


def test_ctrl_c_after_a_task_was_pushed_says_which_tasks_are_kept(tmp_path, base, monkeypatch, capsys):
    registry = tmp_path / "registry"
    Registry.init(registry)
    path = pipeline_file(tmp_path, base, str(registry), epochs=3)
    marker = registry / "patches" / "cl" / "aliases" / "task-1" / "1.json"  # task 1 reached the registry
    process = subprocess.Popen(
        [sys.executable, "-m", "splice", "continual", "run", str(path), "--report", str(tmp_path / "never")],
        env={**os.environ, "PYTHONPATH": str(HERE)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_marker(process, marker)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "nothing was published" not in err
    found = re.fullmatch(
        r"interrupted; (?:task 1 is|tasks 1-(\d) are) kept in the registry \(cl@task-1"
        r"(?: \.\. cl@task-(\d))?\); run it again with --resume \(resume=True\) to go on with "
        r"task (\d) of 3",
        last,
    )
    assert found, last
    kept = int(found.group(3)) - 1
    assert found.group(1) == found.group(2) == (None if kept == 1 else str(kept))
    assert sorted(Registry.open(registry).aliases("cl"))[:kept] == [f"task-{i}" for i in range(1, kept + 1)]
    code, _, err = run_cli(["continual", "run", path, "--resume", "--report", tmp_path / "report"], monkeypatch, capsys)
    assert code == 0, err
    assert json_report(tmp_path / "report")["resumed_tasks"] >= kept
    assert sorted(Registry.open(registry).aliases("cl")) == ["task-1", "task-2", "task-3"]


def test_ctrl_c_right_after_a_tasks_push_returned_counts_that_task_as_kept(tmp_path, base):
    """The Ctrl-C lands once task 1's push (version and alias) returned, before the run counted the task: the
    message still says task 1 is kept (before: a plain interruption, which the CLI reported as nothing kept)."""
    from splice.errors import Interrupted

    registry = Registry.init(tmp_path / "registry")
    real_push = Registry.push

    def push_then_ctrl_c(self, *args, **kwargs):
        real_push(self, *args, **kwargs)
        raise KeyboardInterrupt

    path = pipeline_file(tmp_path, base, str(tmp_path / "registry"), epochs=1, rectify=False, align=None)
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(Registry, "push", push_then_ctrl_c)
        with pytest.raises(Interrupted) as raised:
            run_pipeline(path, registry=registry)
    assert str(raised.value) == (
        "task 1 is kept in the registry (cl@task-1); run it again with --resume (resume=True) to go on with task 2 of 3"
    )
    assert sorted(registry.aliases("cl")) == ["task-1"]
