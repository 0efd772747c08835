"""The continual pipeline's `inference: routed-classes` and `align:` (classifier alignment from per-class feature
statistics): routed-classes predictions against a plain-model computation, the stored statistics against numpy,
a killed run resumed to the numbers of an uninterrupted one, and what is refused before anything is made."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
import yaml
from continual_tasks import TASKS, task, unlabelled_batch
from test_continual import TASK_FILE, kill_once_the_second_task_is_pushed, pipeline_file, tiny_vit

from splice.arch.names import stored_to_module_names
from splice.errors import SpliceError
from splice.hooks import load_callable
from splice.registry.store import Registry
from splice.workflows.continual.pipeline import Pipeline
from splice.workflows.continual.predict import load_bank, predict
from splice.workflows.continual.run import run_pipeline
from splice.workflows.continual.stored import pretrained_values, task_values

from helpers import run_cli

ALIGN = {"samples": 32, "epochs": 2, "lr": 0.05}


def plain_model_with(
    base, store, name: str, slot: int, head_from: str, model_class=transformers.ViTForImageClassification
) -> torch.nn.Module:
    """A plain model (no bank) holding task `slot`'s stored LayerNorm values and the head of version `head_from`."""
    model = model_class.from_pretrained(base).eval()
    module_of = stored_to_module_names(model)
    task_version, head_version = store.load(f"{name}@task-{slot + 1}"), store.load(head_from)
    every = [*task_version.meta.settings["slot"], *head_version.meta.settings["head"]]
    pretrained = pretrained_values(base, every)
    values = {
        **{
            n: v
            for n, v in task_values(head_version.in_memory(), pretrained).items()
            if n in head_version.meta.settings["head"]
        },
        **{
            n: v
            for n, v in task_values(task_version.in_memory(), pretrained).items()
            if n in task_version.meta.settings["slot"]
        },
    }
    model.load_state_dict({module_of[n]: v for n, v in values.items()}, strict=False)
    return model


def test_routed_classes_predict_within_the_routed_tasks_classes(tmp_path):
    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    report = run_pipeline(pipeline_file(tmp_path, base, str(registry), epochs=2, inference="routed-classes"))
    store = Registry.open(registry)
    images = unlabelled_batch()["pixel_values"]
    labels = torch.cat([task(i)["test"]["labels"] for i in range(TASKS)])
    # independently: routing by the stored keys on the pretrained model's CLS features, then each image's logits
    # from a plain model with its routed task's LayerNorm values, argmax over that task's classes only
    pretrained = transformers.ViTForImageClassification.from_pretrained(base).eval()
    with torch.no_grad():
        features = torch.nn.functional.normalize(pretrained.vit(pixel_values=images).last_hidden_state[:, 0], dim=-1)
    keys = torch.stack([torch.tensor(store.load(f"cl@task-{t + 1}").meta.settings["key"]) for t in range(TASKS)])
    routed = (features @ torch.nn.functional.normalize(keys, dim=-1).T).argmax(-1)
    classes = [store.load(f"cl@task-{t + 1}").meta.settings["classes"] for t in range(TASKS)]
    logits = []
    for slot in range(TASKS):
        with torch.no_grad():
            logits.append(plain_model_with(base, store, "cl", slot, "cl@task-3")(pixel_values=images).logits)
    expected = []
    for i, slot in enumerate(routed.tolist()):
        row = logits[slot][i].numpy()
        expected.append(classes[slot][int(np.argmax(row[classes[slot]]))])
    expected = torch.tensor(expected)
    loaded = load_bank("cl@task-3", base, store)
    assert loaded.inference == "routed-classes"
    result = predict(loaded, {"pixel_values": images, "labels": labels})
    assert torch.equal(result.tasks, routed) and torch.equal(result.classes, expected)
    # the restriction must matter whatever the training gave: with one of the first task's classes raised far above
    # every other logit, an image routed elsewhere keeps its prediction only if it is restricted to its task's
    # classes (unrestricted, every image would predict the raised class)
    raised = classes[0][0]
    with torch.no_grad():
        loaded.bank.model.classifier.bias[raised] += 1e3
    result = predict(loaded, {"pixel_values": images, "labels": labels})
    elsewhere = routed != 0
    assert elsewhere.any() and (~elsewhere).any()
    assert torch.equal(result.classes, torch.where(elsewhere, expected, raised))
    per_task = [hits / 12 for hits in (expected == labels).view(TASKS, -1).sum(dim=1).tolist()]
    assert report.accuracy[-1] == per_task  # the run scores as predict does
    assert store.load("cl@task-3").meta.settings["inference"] == "routed-classes"


def test_the_stored_class_statistics_are_the_mean_and_covariance_of_the_heads_inputs(tmp_path):
    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    run_pipeline(
        pipeline_file(
            tmp_path,
            base,
            str(registry),
            epochs=2,
            align=ALIGN,
            tasks=[{"name": f"t{i}", "data": f"{TASK_FILE}:task_{i}"} for i in range(2)],
        )
    )
    store = Registry.open(registry)
    for slot in range(2):
        version = store.load(f"cl@task-{slot + 1}")
        stored = version.meta.settings["class_statistics"]
        train = task(slot)["train"]
        model = plain_model_with(base, store, "cl", slot, f"cl@task-{slot + 1}")
        with torch.no_grad():  # what ViTForImageClassification's classifier takes: the final CLS state
            features = model.vit(pixel_values=train["pixel_values"]).last_hidden_state[:, 0].double().numpy()
        assert sorted(stored) == [str(c) for c in version.meta.settings["classes"]]
        for cls, statistics in stored.items():
            x = features[train["labels"].numpy() == int(cls)]
            assert statistics["count"] == x.shape[0] == 12
            np.testing.assert_allclose(statistics["mean"], x.mean(axis=0), rtol=0, atol=2e-6)
            np.testing.assert_allclose(statistics["covariance"], np.cov(x, rowvar=False, ddof=1), rtol=0, atol=2e-6)
        assert "loss.alignment" in version.meta.metrics


def test_a_killed_run_with_routed_classes_and_alignment_resumes_to_the_same_numbers(tmp_path, monkeypatch, capsys):
    base = tiny_vit(tmp_path / "vit")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    options = {"inference": "routed-classes", "align": ALIGN}
    uninterrupted = run_pipeline(pipeline_file(tmp_path, base, str(whole), name="whole", **options))
    path = pipeline_file(tmp_path, base, str(parts), **options)
    Registry.init(parts)
    kill_once_the_second_task_is_pushed(path, parts, tmp_path / "never")
    finished = len(Registry.open(parts).aliases("cl"))
    assert finished in (2, 3)
    code, _, err = run_cli(
        ["continual", "run", path, "--resume", "--report", tmp_path / "resumed"], monkeypatch, capsys
    )
    assert code == 0, err
    resumed = json.loads((tmp_path / "resumed" / "continual_report.json").read_text())
    assert resumed["resumed_tasks"] == finished and resumed["accuracy"] == uninterrupted.accuracy
    assert resumed["oracle_accuracy"] == uninterrupted.oracle_accuracy
    assert resumed["losses"] == uninterrupted.losses and all("loss.alignment" in row for row in resumed["losses"])
    for slot in range(TASKS):
        final = Registry.open(parts).load(f"cl@task-{slot + 1}")
        expected = Registry.open(whole).load(f"whole@task-{slot + 1}")
        assert all(torch.equal(final.tensors[n], expected.tensors[n]) for n in expected.tensors)
        assert final.meta.settings["class_statistics"] == expected.meta.settings["class_statistics"]


def test_routed_classes_is_refused_for_a_task_incremental_pipeline(tmp_path):
    base = tiny_vit(tmp_path / "vit")
    path = pipeline_file(
        tmp_path, base, str(tmp_path / "registry"), inference="routed-classes", protocol="task-incremental"
    )
    with pytest.raises(SpliceError) as caught:
        run_pipeline(path)
    message = str(caught.value)
    assert "routed-classes is for class-incremental pipelines" in message and len(message.splitlines()) == 1
    assert not (tmp_path / "registry").exists()


TOKEN_TASKS = """
import torch

def _task(index):
    generator = torch.Generator().manual_seed(index)
    split = lambda n: {"input_ids": torch.randint(1, 50, (n, 6), generator=generator),
                       "labels": torch.arange(n) % 2 + 2 * index}
    return {"train": split(10), "test": split(4)}

def task_0():
    return _task(0)

def task_1():
    return _task(1)
"""


def token_pipeline(tmp_path, model, **settings):
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "token_tasks.py").write_text(TOKEN_TASKS)
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": "model",
                "name": "cl",
                "registry": str(tmp_path / "registry"),
                "epochs": 1,
                "batch_size": 4,
                "align": ALIGN,
                **settings,
                "tasks": [{"name": f"t{i}", "data": f"token_tasks.py:task_{i}"} for i in range(2)],
            }
        )
    )
    return path


def test_a_decoders_head_is_aligned_on_the_last_tokens_features(tmp_path):
    # GPT-2's score layer takes every token's hidden state; the model keeps the last non-padding token's logits
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, num_labels=4, pad_token_id=0
    )
    torch.manual_seed(0)
    run_pipeline(token_pipeline(tmp_path, transformers.GPT2ForSequenceClassification(config)))
    store = Registry.open(tmp_path / "registry")
    for slot in range(2):
        version = store.load(f"cl@task-{slot + 1}")
        model = plain_model_with(
            tmp_path / "model", store, "cl", slot, f"cl@task-{slot + 1}", transformers.GPT2ForSequenceClassification
        )
        train = load_callable(f"{tmp_path / 'token_tasks.py'}:task_{slot}", option="test")()["train"]
        with torch.no_grad():  # no padding in these inputs: the last token's final hidden state
            features = model.transformer(input_ids=train["input_ids"]).last_hidden_state[:, -1].double().numpy()
        for cls, statistics in version.meta.settings["class_statistics"].items():
            x = features[train["labels"].numpy() == int(cls)]
            np.testing.assert_allclose(statistics["mean"], x.mean(axis=0), rtol=0, atol=2e-6)
            np.testing.assert_allclose(statistics["covariance"], np.cov(x, rowvar=False, ddof=1), rtol=0, atol=2e-6)


def test_alignment_is_refused_before_anything_is_made_for_a_head_of_two_layers(tmp_path):
    config = transformers.RobertaConfig(
        num_hidden_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=16,
        vocab_size=50,
        max_position_embeddings=16,
        num_labels=4,
        pad_token_id=0,
    )
    path = token_pipeline(tmp_path, transformers.RobertaForSequenceClassification(config))
    with pytest.raises(SpliceError) as caught:
        run_pipeline(path, report_dir=tmp_path / "report")
    message = str(caught.value)
    assert "classifier alignment needs a head that is one linear layer" in message, message
    assert "set align: null" in message and len(message.splitlines()) == 1
    assert not (tmp_path / "registry").exists() and not (tmp_path / "report").exists()


def test_a_pipeline_spelling_out_the_earlier_behaviour_keeps_its_digest():
    # the digest the pipeline had before inference: and align: existed (computed with that code), so registries
    # made then still resume
    spec = {"base": "b", "name": "cl", "tasks": [{"name": "t0", "data": "m:f"}], "epochs": 3, "seed": 7}
    before = "sha256:a4f523d09e1154c28f232f95d4c276487a7cb24fcf0f6344e0d08c90c578cdad"
    assert Pipeline(**spec, inference="all-classes", align=None).digest() == before
    assert Pipeline(**spec, inference="routed-classes").digest() != before
    assert Pipeline(**spec, align={}).digest() != before


def test_results_made_without_alignment_say_how_to_go_on_with_them(tmp_path):
    """A registry of a pipeline run without alignment (as every run was before it became the default), resumed
    with a file that does not mention align: refused before any training, saying to add `align: null`."""
    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    first = [{"name": "t0", "data": f"{TASK_FILE}:task_0"}]
    run_pipeline(pipeline_file(tmp_path, base, str(registry), epochs=1, rectify=False, align=None, tasks=first))
    grown = pipeline_file(tmp_path, base, str(registry), epochs=1, rectify=False)
    assert "align" not in yaml.safe_load(grown.read_text())
    with pytest.raises(SpliceError, match=r"made without classifier alignment \(cl@1\).*add `align: null`"):
        run_pipeline(grown, resume=True)
    assert [m.version for m in Registry.open(registry).versions("cl")] == [1]
    spelled = pipeline_file(tmp_path, base, str(registry), epochs=1, rectify=False, align=None)
    assert run_pipeline(spelled, resume=True).resumed_tasks == 1


def test_draws_follow_each_tasks_class_statistics_even_singular_ones():
    from splice.continual.align import ClassStatistics, class_statistics, sample_features

    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    singular = basis @ basis.T  # rank 2 of 4: what fewer samples than dimensions give
    full = torch.diag(torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64))
    mean = torch.tensor([1.0, -2.0, 0.5, 4.0], dtype=torch.float64)
    # task-incremental: class 1 in both tasks, drawn from each task's statistics
    statistics = [
        {1: ClassStatistics(10, mean, singular), 0: ClassStatistics(10, -mean, full)},
        {1: ClassStatistics(10, 2 * mean, full)},
    ]
    features, labels = sample_features(statistics, 40_000, torch.Generator().manual_seed(1))
    assert labels.tolist() == [0] * 40_000 + [1] * 80_000  # by class, then task
    assert features.dtype == torch.float32
    for part, (expected_mean, expected_covariance) in zip(
        features.split(40_000), [(-mean, full), (mean, singular), (2 * mean, full)]
    ):
        drawn = class_statistics(part, torch.zeros(40_000, dtype=torch.long))[0]
        torch.testing.assert_close(drawn.mean, expected_mean, atol=0.05, rtol=0)
        torch.testing.assert_close(drawn.covariance, expected_covariance, atol=0.1, rtol=0.05)
    again, _ = sample_features(statistics, 40_000, torch.Generator().manual_seed(1))
    assert torch.equal(features, again)
