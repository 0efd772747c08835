"""`--json`: every command that prints a table prints, instead, one JSON document on stdout (nothing else there),
made from the library's own result; checked through real `splice` processes against the library calls."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_continual import TASK_FILE, pipeline_file, tiny_vit

import splice
from splice.adapters.extract import extract_patch_to
from splice.hooks import load_callable
from splice.registry import Registry
from splice.workflows.continual.predict import load_bank, predict
from splice.workflows.inspect import summarize
from splice.workflows.listing import list_versions, summarize_names, version_details
from splice.workflows.publish import publish_patch

from conftest import perturbed, save, tiny_model

ENV = {**os.environ, "PYTHONPATH": str(Path(splice.__file__).parents[1]), "COLUMNS": "200"}


def splice_json(*args, code: int = 0):
    """`splice ARGS --json` in a real process: its stdout parsed as one JSON document."""
    result = subprocess.run(
        [sys.executable, "-m", "splice", *map(str, args), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == code, result.stderr
    assert result.stdout.lstrip().startswith("{"), result.stdout  # no table or line before the document
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """Old base v1, two fine-tunes, an evolved base v2, a delta and a LoRA patch, and a registry holding both
    patches as versions 1 and 2 of one name (alias prod on 2)."""
    root = tmp_path_factory.mktemp("json")
    base = tiny_model("llama", 0)
    paths = {
        "v1": save(base, root / "v1", False),
        "tuned": save(perturbed(base, 1, 0.05), root / "tuned", False),
        "tuned2": save(perturbed(base, 2, 0.05), root / "tuned2", False),
        "v2": save(perturbed(base, 7, 0.002), root / "v2", False),
        "root": root,
    }
    extract_patch_to(root / "delta", paths["v1"], paths["tuned"], "delta")
    extract_patch_to(root / "lora", paths["v1"], paths["tuned"], "lora", rank=2)
    registry = Registry.init(root / "registry")
    publish_patch(registry, "adapt", root / "delta", message="first")
    publish_patch(registry, "adapt", root / "lora", alias="prod", message="second")
    paths["registry"] = root / "registry"
    return paths


def test_registry_commands(lineage):
    registry = Registry.open(lineage["registry"])
    where = ["--registry", lineage["registry"]]

    listed = splice_json("registry", "ls", *where)
    [summary] = summarize_names(registry)
    assert listed["registry"] == registry.url
    assert [(n["name"], n["latest"], n["versions"]) for n in listed["names"]] == [("adapt", 2, 2)]
    assert listed["names"][0]["aliases"]["prod"]["version"] == summary.aliases["prod"].version == 2

    versions = splice_json("registry", "ls", "adapt", *where)
    (first, _), (second, _) = list_versions(registry, "adapt")[0]
    assert [(v["version"], v["digest"], v["aliases"], v["message"]) for v in versions["versions"]] == [
        (1, first.digest, [], "first"),
        (2, second.digest, ["prod"], "second"),
    ]
    assert versions["problems"] == []

    shown = splice_json("registry", "show", "adapt@prod", *where)
    details = version_details(registry, "adapt@prod")
    assert shown["manifest"]["digest"] == details.manifest.digest and shown["pointing"] == ["prod"]
    assert shown["manifest"]["meta"]["kind"] == "lora" and shown["health"] == []
    assert shown["manifest"]["num_parameters"] == details.manifest.num_parameters

    compared = splice_json("registry", "diff", "adapt@1", "adapt@2", *where)
    report = registry.diff("adapt@1", "adapt@2")
    assert compared["identical"] is False and compared["digest_a"] == first.digest
    assert [(t["name"], t["status"]) for t in compared["tensors"]] == [(t.name, t.status) for t in report.tensors]

    verified = splice_json("registry", "verify", *where)
    expected = registry.verify()
    assert verified["ok"] is True and verified["problems"] == []
    assert (verified["blobs_checked"], verified["bytes_checked"], verified["versions_checked"]) == (
        expected.blobs_checked,
        expected.bytes_checked,
        expected.versions_checked,
    )

    collected = splice_json("registry", "gc", "--grace", "0", *where)
    again = registry.gc(grace_seconds=0)
    assert collected["blobs_removed"] == 0 and collected["blobs_kept_live"] == again.blobs_kept_live > 0

    pushed = splice_json("registry", "push", "other", lineage["root"] / "delta", "--alias", "prod", *where)
    stored = version_details(registry, "other@prod").manifest
    assert (pushed["name"], pushed["version"], pushed["digest"]) == ("other", 1, stored.digest)
    assert pushed["push_stats"]["bytes_written"] == 0  # every blob was already there (version adapt@1)


def test_a_broken_registry_still_prints_json_and_exits_1(lineage, tmp_path):
    copy = Path(shutil.copytree(lineage["registry"], tmp_path / "registry"))
    blob = next(p for p in copy.rglob("*") if p.is_file() and "blobs" in p.parts)
    blob.write_bytes(blob.read_bytes()[:-1] + bytes([blob.read_bytes()[-1] ^ 1]))
    verified = splice_json("registry", "verify", "--registry", copy, code=1)
    expected = Registry.open(copy).verify()
    assert verified["ok"] is False
    assert (
        [(p["path"], p["problem"], p["versions"]) for p in verified["problems"]]
        == [(p.path, p.problem, p.versions) for p in expected.problems]
        != []
    )


def test_inspect_and_deploy(lineage, tmp_path):
    inspected = splice_json("inspect", lineage["v1"])
    summary = summarize(lineage["v1"])
    assert (inspected["tensors"], inspected["parameters"], inspected["nbytes"]) == (
        summary.tensors,
        summary.parameters,
        summary.nbytes,
    )
    assert [m["name"] for m in inspected["norm_modules"]] == [m.name for m in summary.norm_modules]
    assert inspected["deployment"] is None and inspected["dtypes"] == summary.dtypes

    deployed = splice_json(
        "deploy",
        "adapt@1",
        "--base",
        lineage["v1"],
        "--out",
        tmp_path / "deployed",
        "--registry",
        lineage["registry"],
        "--device",
        "cpu",
    )
    record = splice.read_deployment_record(tmp_path / "deployed")
    assert deployed["deployment"]["patches"] == [p.model_dump(mode="json") for p in record.patches]
    assert deployed["stream"]["tensors"] == summary.tensors
    assert sorted(deployed["stream"]["shard_files"]) == sorted(
        p.name for p in (tmp_path / "deployed").glob("*.safetensors")
    )
    assert (
        splice_json("inspect", tmp_path / "deployed")["deployment"]["patches"][0]["digest"] == record.patches[0].digest
    )


def test_port(lineage, tmp_path):
    ported = splice_json(
        "port",
        lineage["root"] / "delta",
        "--to",
        lineage["v2"],
        "--from",
        lineage["v1"],
        "--as-patch",
        tmp_path / "cli",
        "--device",
        "cpu",
    )
    library = splice.port_patch(
        lineage["root"] / "delta", lineage["v2"], as_patch=tmp_path / "py", old_base=lineage["v1"], device="cpu"
    )
    expected = json.loads(library.drift.json_bytes())
    assert ported["ported"]["drift"] == expected
    assert ported["ported"]["written"] == str(tmp_path / "cli") and ported["pushed"] is None
    assert ported["ported"]["patch"]["parameters"] == library.patch.num_parameters
    assert ported["ported"]["patch"]["meta"]["base"]["digest"] == library.patch.meta.base.digest


def test_soups_merge_and_patches(lineage, tmp_path):
    models = [lineage["v1"], lineage["tuned"], lineage["tuned2"]]
    scorer = tmp_path / "score.py"
    scorer.write_text("def score(state):\n    return -float(state['model.norm.weight'].sub(1.01).abs().sum())\n")
    greedy = splice_json(
        "soup", *models, "--out", tmp_path / "greedy", "--greedy", "--eval", f"{scorer}:score", "--device", "cpu"
    )
    report = splice.greedy_soup(models, tmp_path / "greedy-py", f"{scorer}:score", device="cpu")
    assert [(s["model"], s["score"], s["soup_score"], s["kept"]) for s in greedy["steps"]] == [
        (s.model, s.score, s.soup_score, s.kept) for s in report.steps
    ]
    assert greedy["soup_score"] == report.soup_score and greedy["kept"] == report.kept
    assert greedy["notes"] == report.notes

    uniform = splice_json("soup", *models, "--out", tmp_path / "uniform", "--device", "cpu")
    streamed = splice.soup(models, tmp_path / "uniform-py", device="cpu")
    assert (uniform["tensors"], uniform["bytes_written"], uniform["shard_files"]) == (
        streamed.tensors,
        streamed.bytes_written,
        streamed.shard_files,
    )

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {lineage['v1']}\nmodels:\n"
        f"  - model: {lineage['tuned']}\n    parameters: {{weight: 0.5}}\n"
    )
    merged = splice_json("merge", recipe, "--out", tmp_path / "merged", "--device", "cpu")
    assert merged["out"] == str(tmp_path / "merged") and merged["tensors"] == streamed.tensors

    extracted = splice_json(
        "patch",
        "extract",
        "--base",
        lineage["v1"],
        "--tuned",
        lineage["tuned"],
        "--kind",
        "lora",
        "--rank",
        "2",
        "--out",
        tmp_path / "lora",
        "--device",
        "cpu",
    )
    patch = splice.Patch.load(tmp_path / "lora")
    on_disk = json.loads((tmp_path / "lora" / "patch.json").read_text())
    assert extracted["out"] == str(tmp_path / "lora") and extracted["patch"]["meta"]["kind"] == on_disk["kind"]
    assert extracted["patch"]["meta"]["settings"] == on_disk["settings"]
    assert extracted["patch"]["parameters"] == patch.num_parameters
    assert extracted["patch"]["shapes"] == {name: list(shape) for name, shape in patch.shapes.items()}
    applied = splice_json(
        "patch", "apply", tmp_path / "lora", "--base", lineage["v1"], "--out", tmp_path / "applied", "--device", "cpu"
    )
    assert applied["tensors"] == streamed.tensors and applied["out"] == str(tmp_path / "applied")


def test_fuse(tmp_path):
    a = save(tiny_model("bert", 0), tmp_path / "a", False)
    b = save(tiny_model("bert", 1), tmp_path / "b", False)
    fused = splice_json("fuse", a, b, "--out", tmp_path / "cli", "--align", "weights", "--device", "cpu")
    report = splice.fuse([a, b], tmp_path / "py", align="weights", device="cpu")
    saved = json.loads((tmp_path / "cli" / "fusion_report.json").read_text())
    assert fused["layers"] == saved["layers"] == json.loads(json.dumps(report.to_json()))["layers"]
    assert [m["cost"] for m in fused["maps"]] == [m.cost for m in report.maps]
    assert fused["models"] == [str(a), str(b)] and fused["out"] == str(tmp_path / "cli")


def test_continual_run_and_predict(tmp_path):
    base = tiny_vit(tmp_path / "vit")
    registry = tmp_path / "registry"
    ran = splice_json(
        "continual", "run", pipeline_file(tmp_path, base, str(registry), epochs=1), "--report", tmp_path / "report"
    )
    saved = json.loads((tmp_path / "report" / "continual_report.json").read_text())
    assert ran == saved and len(ran["accuracy"]) == 3 and ran["resumed_tasks"] == 0

    predicted = splice_json(
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
        "--device",
        "cpu",
    )
    loaded = load_bank("cl@task-2", base, str(registry), device="cpu")
    result = predict(loaded, load_callable(f"{TASK_FILE}:unlabelled_batch")())
    assert predicted == {
        "bank": loaded.refs,
        "classes": result.classes.tolist(),
        "tasks": result.tasks.tolist(),
        "accuracy": None,
    }
    assert torch.equal(torch.tensor(predicted["tasks"]), result.tasks)


def test_the_type_checking_imports_mirror_the_lazy_exports():
    """What type checkers and IDEs see (`if TYPE_CHECKING:` imports) is what `splice.NAME` resolves to at run time."""
    import ast
    import importlib

    tree = ast.parse(Path(splice.__file__).read_text())
    block = next(
        node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
    )
    mirrored = {
        alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert mirrored == splice._EXPORTS
    for name, module in mirrored.items():  # each names the object the lazy lookup returns
        assert getattr(splice, name) is getattr(importlib.import_module(module), name)
    bare = subprocess.run(
        [sys.executable, "-c", "import sys, splice; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert bare.stdout.strip() == "False", bare.stderr  # importing splice still loads no torch


def test_dir_lists_only_the_api():
    assert dir(splice) == sorted(splice.__all__)
    assert "sys" not in dir(splice) and "types" not in dir(splice) and "__version__" in dir(splice)
