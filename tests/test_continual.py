"""The continual pipeline: metrics against hand computations, bad pipelines refused before training, a 3-task run
into a memory:// registry, and a killed run resumed to the same numbers as an uninterrupted one."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from continual_tasks import TASKS, _split, task, unlabelled_batch
from safetensors.torch import load_file

from splice.adapters.apply import apply_patches
from splice.arch.names import stored_to_module_names
from splice.continual import metrics
from splice.errors import SpliceError
from splice.registry.store import Registry
from splice.workflows.continual.pipeline import load_pipeline
from splice.workflows.continual.predict import load_bank, predict
from splice.workflows.continual.run import run_pipeline

from helpers import run_cli, wait_for_marker

HERE = Path(__file__).resolve().parent
TASK_FILE = HERE / "continual_tasks.py"
MATRIX = [[0.9], [0.6, 0.8], [0.5, 0.7, 0.95]]


def test_metrics_on_a_hand_made_accuracy_matrix():
    # by hand: A = [0.9, 0.7, 0.7167]; forgetting: task 0 best 0.9 -> 0.5 (0.4), task 1 best 0.8 -> 0.7 (0.1)
    summary = metrics.summarize(MATRIX)
    assert summary.average_accuracies == pytest.approx([0.9, 0.7, (0.5 + 0.7 + 0.95) / 3])
    assert summary.final_average_accuracy == pytest.approx(2.15 / 3)
    assert summary.average_incremental_accuracy == pytest.approx((0.9 + 0.7 + 2.15 / 3) / 3)
    assert summary.forgetting == pytest.approx((0.4 + 0.1) / 2)
    assert summary.backward_transfer == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    # forgetting takes the best earlier accuracy, not the first: task 0 peaks after task 1 here
    assert metrics.forgetting([[0.5], [0.8, 0.6], [0.4, 0.6, 0.9]]) == pytest.approx((0.4 + 0.0) / 2)
    assert metrics.forgetting([[0.7]]) == 0.0 and metrics.backward_transfer([[0.7]]) == 0.0
    with pytest.raises(ValueError, match="row 1 of the accuracy matrix has 1 entries"):
        metrics.summarize([[0.5], [0.5]])


def tiny_vit(directory: Path, labels: int = 2 * TASKS) -> Path:
    """A tiny ViT 'pretrained' (80 full-batch steps) on images drawn apart from the tasks' own, saved with a fresh
    head of `labels` classes: its CLS features separate the tasks and their classes, as a real pretrained
    backbone's do for the domain it was trained on. Trained on one thread: the same base on every machine (its
    80 Adam steps amplify the last bits that a different thread count's sums round differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain_tiny_vit(directory, labels)
    finally:
        torch.set_num_threads(threads)


def _pretrain_tiny_vit(directory: Path, labels: int) -> Path:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2 * TASKS,
    )
    model = transformers.ViTForImageClassification(config)
    splits = [_split(t, 32, 900 + t) for t in range(TASKS)]
    images, family = torch.cat([s["pixel_values"] for s in splits]), torch.cat([s["labels"] for s in splits])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(pixel_values=images).logits, family).backward()
        optimizer.step()
    config.num_labels = labels
    fresh = transformers.ViTForImageClassification(config)
    fresh.vit.load_state_dict(model.vit.state_dict())
    fresh.save_pretrained(directory)
    return directory


def pipeline_file(tmp_path: Path, base: Path, registry: str, name: str = "cl", **overrides) -> Path:
    spec = {
        "base": str(base),
        "name": name,
        "registry": registry,
        "epochs": 3,
        "lr": 0.05,
        "head_lr": 0.05,
        "batch_size": 8,
        "seed": 0,
        "tasks": [{"name": f"t{i}", "data": f"{TASK_FILE}:task_{i}"} for i in range(TASKS)],
    } | overrides
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_three_task_pipeline_runs_into_a_memory_registry_and_predicts(tmp_path, monkeypatch, capsys):
    base = tiny_vit(tmp_path / "vit")
    # task-incremental: scored within each task's classes (class-incremental scoring of a head this small is
    # dominated by how the tasks' logits compare, which the method leaves uncalibrated; the resume test runs it)
    report = run_pipeline(
        pipeline_file(tmp_path, base, "memory://continual-test/registry", protocol="task-incremental"),
        report_dir=tmp_path / "report",
    )
    store = Registry.open("memory://continual-test/registry")
    try:
        assert [v.version for v in store.versions("cl")] == [1, 2, 3]
        assert sorted(store.aliases("cl")) == ["task-1", "task-2", "task-3"]
        assert [len(row) for row in report.accuracy] == [1, 2, 3]
        assert report.task_id_accuracy[-1] > 0.75, report.task_id_accuracy  # chance: 1/3
        assert report.final_average_accuracy == pytest.approx(sum(report.accuracy[-1]) / 3)
        assert report.final_average_accuracy > 0.8, report.accuracy
        stored = json.loads((tmp_path / "report" / "continual_report.json").read_text())
        assert stored["accuracy"] == report.accuracy
        for png in ("accuracy_matrix.png", "average_accuracy.png"):
            assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
        version = store.load("cl@task-2")
        assert version.meta.metrics["accuracy.0"] == report.accuracy[1][0]
        assert len(version.meta.settings["key"]) == 32 and version.meta.settings["classes"] == [2, 3]
        reads = []
        batch_reads = type(store._backend).read_ranges
        with pytest.MonkeyPatch.context() as patcher:
            patcher.setattr(
                type(store._backend),
                "read_ranges",
                lambda self, items: reads.append(len(items)) or batch_reads(self, items),
            )
            loaded = load_bank("cl@task-3", base, store)
        assert reads == [1] * TASKS  # one batch of one ranged read (its pack) per task's version
        result = predict(
            loaded, {**unlabelled_batch(), "labels": torch.cat([task(i)["test"]["labels"] for i in range(TASKS)])}
        )
        truth = torch.arange(TASKS).repeat_interleave(12)
        assert float((result.tasks == truth).float().mean()) == pytest.approx(report.task_id_accuracy[-1])
        # independently of the bank: task t's LayerNorm values and the last head on a plain model, by stored name
        last = store.load("cl@task-3")
        for slot in range(TASKS):
            model = transformers.ViTForImageClassification.from_pretrained(base).eval()
            module_of = stored_to_module_names(model)
            values = {
                **{n: last.tensors[n] for n in last.meta.settings["head"]},
                **{n: store.load(f"cl@task-{slot + 1}").tensors[n] for n in last.meta.settings["slot"]},
            }
            model.load_state_dict({module_of[n]: v for n, v in values.items()}, strict=False)
            chosen = result.tasks == slot
            with torch.no_grad():
                logits = model(pixel_values=unlabelled_batch()["pixel_values"][chosen]).logits
            assert torch.equal(logits.argmax(-1), result.classes[chosen])
        code, _, err = run_cli(
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
                "memory://continual-test/registry",
                "--out",
                tmp_path / "predictions.json",
            ],
            monkeypatch,
            capsys,
        )
        written = json.loads((tmp_path / "predictions.json").read_text())
        assert code == 0, err
        assert written["tasks"] == result.tasks.tolist() and written["classes"] == result.classes.tolist()
        assert written["accuracy"] is None and len(written["bank"]) == TASKS
    finally:
        Registry.open("memory://continual-test/registry")._backend.fs.rm("/continual-test", recursive=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochz": 3}, "unknown key 'epochz' (did you mean 'epochs'?)"),
        (
            {"tasks": [{"name": "t0", "data": f"{TASK_FILE}:task_0"}, {"name": "t1", "data": f"{TASK_FILE}:empty"}]},
            "task t1",
        ),
        (
            {
                "tasks": [
                    {"name": "t0", "data": f"{TASK_FILE}:task_0"},
                    {"name": "t1", "data": f"{TASK_FILE}:overlapping"},
                ]
            },
            "tasks t0 and t1 both have class 0",
        ),
        ({"tasks": [{"name": "t0", "data": f"{TASK_FILE}:nothing_here"}]}, "has no function nothing_here"),
        ({"norms": ["layernorm_before", "no_such_norm"]}, "norms: 'no_such_norm' matches no norm of the model"),
        ({"base": "no-such-model"}, "no-such-model: not a model directory with a config.json"),
        ({"seed": 2**63}, "seed: Value error, 9223372036854775808 is out of range"),
        ({"seed": 2**62}, "give a seed between -92230953439944 and 92230953439944"),  # x 100003 overflows
        ({"head_lr": 1e38}, "head_lr: Input should be less than or equal to 1"),
        ({"name": "CL"}, "registry name 'CL' is not allowed: use lowercase letters"),
        ({"norms": []}, "norms: Value error, an empty list tunes no norm (only the head would train)"),
        (
            {
                "tasks": [
                    {"name": "t0", "data": f"{TASK_FILE}:task_0"},
                    {"name": "t1", "data": f"{TASK_FILE}:negative_label"},
                ]
            },
            "task t1: label -1 does not fit the model's head of 6 labels",
        ),
        # found by a dry pass of one batch per task before task 0 trains, not after it was pushed
        (
            {
                "tasks": [
                    {"name": "t0", "data": f"{TASK_FILE}:task_0"},
                    {"name": "t1", "data": f"{TASK_FILE}:three_channels"},
                ]
            },
            "task t1 test: the model cannot take these inputs (Make sure that the channel dimension",
        ),
        (
            {
                "tasks": [
                    {"name": "t0", "data": f"{TASK_FILE}:task_0"},
                    {"name": "t1", "data": f"{TASK_FILE}:overflowing"},
                ]
            },
            "task t1 train: the model's routing features on these inputs are not finite (inf or nan)",
        ),
    ],
)
def test_bad_pipelines_are_refused_before_any_training(tmp_path, overrides, message):
    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    others = {key: value for key, value in overrides.items() if key != "base"}
    path = pipeline_file(tmp_path, overrides.get("base", base), str(registry), **others)
    with pytest.raises(SpliceError) as caught:
        run_pipeline(path, report_dir=tmp_path / "report")
    assert message in str(caught.value) and len(str(caught.value).splitlines()) == 1
    assert not registry.exists() and not (tmp_path / "report").exists()  # nothing made, not even the registry


def test_inputs_the_model_cannot_take_are_one_error_line_before_the_registry_is_made(tmp_path, monkeypatch, capsys):
    registry = tmp_path / "registry"
    path = pipeline_file(
        tmp_path,
        tiny_vit(tmp_path / "vit"),
        str(registry),
        tasks=[{"name": "t0", "data": f"{TASK_FILE}:task_0"}, {"name": "t1", "data": f"{TASK_FILE}:three_channels"}],
    )
    code, out, err = run_cli(["continual", "run", path, "--report", tmp_path / "report"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err  # was a traceback after task t0 was pushed
    assert err.startswith("error: task t1 test: the model cannot take these inputs (Make sure that the channel")
    assert not registry.exists() and not (tmp_path / "report").exists()


def test_another_pipeline_under_the_same_name_is_refused(tmp_path):
    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    Registry.init(registry)
    run_pipeline(
        pipeline_file(
            tmp_path,
            base,
            str(registry),
            epochs=1,
            rectify=False,
            tasks=[{"name": "t0", "data": f"{TASK_FILE}:task_0"}],
        )
    )
    with pytest.raises(SpliceError, match="already holds another pipeline's results"):
        run_pipeline(
            pipeline_file(
                tmp_path, base, str(registry), epochs=2, tasks=[{"name": "t0", "data": f"{TASK_FILE}:task_0"}]
            )
        )
    with pytest.raises(SpliceError, match="pass `resume=True`"):
        run_pipeline(
            pipeline_file(
                tmp_path,
                base,
                str(registry),
                epochs=1,
                rectify=False,
                tasks=[{"name": "t0", "data": f"{TASK_FILE}:task_0"}],
            )
        )


def kill_once_the_second_task_is_pushed(path: Path, registry: Path, report: Path) -> None:
    """`splice continual run PATH` in a subprocess, SIGKILLed once task 2's alias reached the registry."""
    marker = registry / "patches" / "cl" / "aliases" / "task-2" / "1.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "splice", "continual", "run", str(path), "-q", "--report", str(report)],
        env={**os.environ, "PYTHONPATH": str(HERE)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_marker(process, marker)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)


def test_a_killed_run_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    base = tiny_vit(tmp_path / "vit")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for registry in (whole, parts):
        Registry.init(registry)
    uninterrupted = run_pipeline(pipeline_file(tmp_path, base, str(whole)))
    path = pipeline_file(tmp_path, base, str(parts))
    kill_once_the_second_task_is_pushed(path, parts, tmp_path / "never")
    finished = len(Registry.open(parts).aliases("cl"))
    assert finished in (2, 3) and not (tmp_path / "never").exists()
    code, out, err = run_cli(
        ["continual", "run", path, "--resume", "--report", tmp_path / "resumed"], monkeypatch, capsys
    )
    assert code == 0, err
    resumed = json.loads((tmp_path / "resumed" / "continual_report.json").read_text())
    assert resumed["resumed_tasks"] == finished and resumed["accuracy"] == uninterrupted.accuracy
    assert resumed["task_id_accuracy"] == uninterrupted.task_id_accuracy
    assert resumed["losses"] == uninterrupted.losses
    final = Registry.open(parts).load("cl@task-3").tensors
    expected = Registry.open(whole).load("cl@task-3").tensors
    assert all(torch.equal(final[name], expected[name]) for name in expected)


def test_relative_paths_in_a_pipeline_file_are_relative_to_it(tmp_path):
    tiny_vit(tmp_path / "vit")
    (tmp_path / "continual_tasks.py").write_text(TASK_FILE.read_text())
    (tmp_path / "p.yaml").write_text(
        yaml.safe_dump(
            {
                "base": "vit",
                "name": "cl",
                "tasks": [
                    {"name": "t0", "data": "continual_tasks.py:task_0"},
                    {"name": "t1", "data": "continual_tasks:task_1"},
                ],
            }
        )
    )
    pipeline = load_pipeline(tmp_path / "p.yaml")
    assert pipeline.base == str(tmp_path / "vit")
    assert [t.data for t in pipeline.tasks] == [f"{tmp_path / 'continual_tasks.py'}:task_0", "continual_tasks:task_1"]


def test_a_pipeline_grown_by_a_task_resumes_after_the_tasks_it_had(tmp_path):
    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    settings = {"epochs": 1, "rectify": False}
    tasks = [{"name": f"t{i}", "data": f"{TASK_FILE}:task_{i}"} for i in range(TASKS)]
    run_pipeline(pipeline_file(tmp_path, base, str(registry), tasks=tasks[:2], **settings))
    grown = run_pipeline(pipeline_file(tmp_path, base, str(registry), tasks=tasks, **settings), resume=True)
    assert grown.resumed_tasks == 2 and len(grown.accuracy) == 3
    assert [v.version for v in Registry.open(registry).versions("cl")] == [1, 2, 3]


def test_a_task_pushed_but_not_aliased_is_taken_up_on_resume(tmp_path, monkeypatch):
    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    path = pipeline_file(tmp_path, base, str(registry), epochs=1, rectify=False)
    tag = Registry.tag

    def interrupted(self, name, alias, version, **kwargs):
        if alias == "task-2":
            raise KeyboardInterrupt  # Ctrl-C after task 2's version was created, before its alias
        return tag(self, name, alias, version, **kwargs)

    monkeypatch.setattr(Registry, "tag", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(path)
    monkeypatch.setattr(Registry, "tag", tag)
    assert sorted(Registry.open(registry).aliases("cl")) == ["task-1"]
    resumed = run_pipeline(path, resume=True)
    store = Registry.open(registry)
    assert resumed.resumed_tasks == 2 and [v.version for v in store.versions("cl")] == [1, 2, 3]
    assert {alias: record.version for alias, record in store.aliases("cl").items()} == {
        "task-1": 1,
        "task-2": 2,
        "task-3": 3,
    }


def test_predict_refuses_a_base_the_bank_was_not_trained_on(tmp_path):
    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    run_pipeline(
        pipeline_file(
            tmp_path,
            base,
            str(registry),
            epochs=1,
            rectify=False,
            tasks=[{"name": "t0", "data": f"{TASK_FILE}:task_0"}],
        )
    )
    other = transformers.ViTForImageClassification.from_pretrained(base)
    with torch.no_grad():
        other.vit.layernorm.weight.add_(0.5)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SpliceError, match="is not the base this layernorm patch was made for"):
        load_bank("cl@task-1", tmp_path / "other", registry)


def test_a_chosen_subset_of_norms_is_all_that_trains_and_is_stored(tmp_path):
    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    run_pipeline(
        pipeline_file(
            tmp_path,
            base,
            str(registry),
            epochs=1,
            rectify=False,
            norms=["layernorm_after"],
            tasks=[{"name": f"t{i}", "data": f"{TASK_FILE}:task_{i}"} for i in range(2)],
        )
    )
    store = Registry.open(registry)
    pretrained = transformers.ViTForImageClassification.from_pretrained(base).state_dict()
    stored = stored_to_module_names(transformers.ViTForImageClassification.from_pretrained(base))
    for alias in ("cl@task-1", "cl@task-2"):
        patch = store.load(alias)
        slot = patch.meta.settings["slot"]
        assert slot == sorted(n for n in stored if ".layernorm_after." in n) and len(slot) == 4
        assert all(not torch.equal(patch.tensors[n], pretrained[stored[n]]) for n in slot)


def test_a_trained_key_converges_to_the_closed_form_optimum(tmp_path):
    from splice.continual.bank import LayerNormBank
    from splice.continual.data import load_task
    from splice.continual.train import Schedule, task_features, task_key

    bank = LayerNormBank(transformers.ViTForImageClassification.from_pretrained(tiny_vit(tmp_path / "vit")).eval())
    data = load_task("t0", f"{TASK_FILE}:task_0")
    schedule = Schedule(epochs=1, lr=0.1, head_lr=0.1, rectify_epochs=1, batch_size=8)
    closed = task_key(bank, data, schedule, torch.Generator().manual_seed(0))
    trained = task_key(bank, data, schedule, torch.Generator().manual_seed(0), trained=True, epochs=60, lr=0.05)
    features = torch.nn.functional.normalize(task_features(bank, data, 8), dim=-1)
    score = {name: float((features @ (k / k.norm())).mean()) for name, k in (("closed", closed), ("trained", trained))}
    assert score["trained"] <= score["closed"] + 1e-6  # the closed form is the maximum
    assert float(torch.nn.functional.cosine_similarity(closed, trained, dim=0)) > 0.99, score


def test_fisher_diagonal_equals_per_sample_gradients_of_a_plain_model(tmp_path):
    from splice.continual.bank import LayerNormBank
    from splice.continual.data import load_task
    from splice.continual.fisher import fisher_diagonal

    base = tiny_vit(tmp_path / "vit")
    bank = LayerNormBank(transformers.ViTForImageClassification.from_pretrained(base).eval())
    slot = bank.add_task()
    data = load_task("t1", f"{TASK_FILE}:task_1")
    fisher = fisher_diagonal(bank, slot, bank.slot_parameters(slot), data)
    plain = transformers.ViTForImageClassification.from_pretrained(base).eval()
    module_of = stored_to_module_names(plain)
    parameters = dict(plain.named_parameters())
    expected = {name: torch.zeros_like(parameters[module_of[name]]) for name in fisher}
    images, labels = data.train["pixel_values"], data.train["labels"]
    for image, label in zip(images, labels):  # -log p(y|x) over the task's classes 2 and 3 only
        logits = plain(pixel_values=image[None]).logits[:, [2, 3]]
        grads = torch.autograd.grad(
            torch.nn.functional.cross_entropy(logits, (label - 2)[None]), [parameters[module_of[n]] for n in fisher]
        )
        for name, grad in zip(fisher, grads):
            expected[name] += grad**2 / len(labels)
    for name in fisher:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-10, msg=name)


def test_fisher_subsets_keep_the_top_share_or_whole_modules_or_a_random_share():
    from splice.continual.fisher import subset_masks
    from splice.workflows.continual.pipeline import FisherSubset

    fisher = {
        "a.ln.weight": torch.tensor([5.0, 1.0, 0.0, 9.0]),
        "a.ln.bias": torch.tensor([2.0, 0.5, 0.1, 0.2]),
        "b.ln.weight": torch.tensor([3.0, 3.0, 3.0, 3.0]),
        "b.ln.bias": torch.tensor([3.0, 3.0, 3.0, 3.0]),
    }
    top = subset_masks(fisher, FisherSubset(fraction=0.25), torch.Generator().manual_seed(0))
    assert [sorted(torch.cat(list(fisher.values()))[torch.cat(list(top.values()))].tolist())] == [[3.0, 3.0, 5.0, 9.0]]
    assert sum(int(m.sum()) for m in top.values()) == 4
    modules = subset_masks(fisher, FisherSubset(fraction=0.5, granularity="modules"), torch.Generator())
    assert modules["b.ln.weight"].all() and modules["b.ln.bias"].all()  # summed 24 beats 17.8
    assert not modules["a.ln.weight"].any()
    drawn = subset_masks(fisher, FisherSubset(fraction=0.25, random=True), torch.Generator().manual_seed(1))
    assert sum(int(m.sum()) for m in drawn.values()) == 4
    again = subset_masks(fisher, FisherSubset(fraction=0.25, random=True), torch.Generator().manual_seed(1))
    assert all(torch.equal(drawn[n], again[n]) for n in drawn)


def test_a_fisher_pipeline_stores_sparse_deltas_over_the_pretrained_norms(tmp_path):
    from splice.adapters.meta import PatchKind
    from splice.workflows.continual.stored import pretrained_values, task_values

    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    report = run_pipeline(
        pipeline_file(
            tmp_path,
            base,
            str(registry),
            epochs=2,
            fisher={"fraction": 0.1},
            tasks=[{"name": f"t{i}", "data": f"{TASK_FILE}:task_{i}"} for i in range(2)],
        )
    )
    store = Registry.open(registry)
    patch = store.load("cl@task-2")
    total = sum(v.numel() for v in pretrained_values(base, patch.meta.settings["slot"]).values())
    assert patch.meta.kind is PatchKind.mask
    every = [
        n
        for n in stored_to_module_names(transformers.ViTForImageClassification.from_pretrained(base))
        if "layernorm" in n
    ]
    kept = sum(patch.meta.settings["kept"][n] for n in patch.meta.settings["slot"])
    assert kept == math.ceil(0.1 * sum(pretrained_values(base, every)[n].numel() for n in every))
    assert report.parameters_per_task == [kept_of(store.load("cl@task-1")), kept] and kept < total
    values = task_values(patch, pretrained := pretrained_values(base, [*every, *patch.meta.settings["head"]]))
    changed = sum(int((values[n] != pretrained[n]).sum()) for n in patch.meta.settings["slot"])
    assert 0 < changed <= kept
    apply_patches([store.load("cl@task-2")], base, tmp_path / "applied")  # splice patch apply of the version
    applied = load_file(tmp_path / "applied" / "model.safetensors")
    assert all(torch.equal(applied[n], values[n]) for n in values)


def kept_of(patch) -> int:
    return sum(patch.meta.settings["kept"][n] for n in patch.meta.settings["slot"])
