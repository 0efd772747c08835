"""`splice deploy`: registry refs resolved, checked against the base, applied streamed, and recorded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from splice.adapters.extract import extract_patch
from splice.adapters.fingerprint import fingerprint_base
from splice.adapters.patch import Patch, PatchError, PatchMeta
from splice.errors import SpliceError
from splice.registry.store import Registry
from splice.tensors.checkpoint import Checkpoint
from splice.workflows.deploy import apply_ref, deploy, read_deployment_record

from conftest import example_inputs, model_class, perturbed, save, tiny_model
from helpers import load_dir, run_cli


@pytest.fixture
def setup(tmp_path):
    """A base, a fine-tune of it, and a registry holding its LayerNorm patch and the delta of everything else."""
    base = tiny_model("bert", 0)
    base_dir = save(base, tmp_path / "base", sharded=True)
    tuned_dir = save(perturbed(base, 3), tmp_path / "tuned", sharded=False)
    layernorm = extract_patch(base_dir, tuned_dir, "layernorm")
    delta = extract_patch(base_dir, tuned_dir, "delta")
    rest = {name: tensor for name, tensor in delta.tensors.items() if name not in layernorm.tensors}
    rest_patch = Patch(
        rest, PatchMeta(kind="delta", targets=sorted(rest), base=fingerprint_base(Checkpoint.open(base_dir), rest))
    )
    registry = Registry.init(str(tmp_path / "registry"))
    registry.push("task-ln", layernorm, alias="prod")
    registry.push("task-delta", rest_patch)
    return base_dir, tuned_dir, registry


def test_deployed_model_is_the_fine_tune_and_says_what_it_carries(setup, tmp_path):
    base_dir, tuned_dir, registry = setup
    record, report = deploy(["task-ln@prod", "task-delta"], base_dir, tmp_path / "out", registry=registry, device="cpu")
    out, tuned = load_dir(tmp_path / "out"), load_dir(tuned_dir)
    assert set(out) == set(tuned)
    for name in tuned:
        torch.testing.assert_close(out[name], tuned[name], rtol=0, atol=1e-6)
    reloaded, info = model_class("bert").from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    assert [(p.ref, p.name, p.version, p.kind, p.base_check) for p in record.patches] == [
        ("task-ln@prod", "task-ln", 1, "layernorm", "verified"),
        ("task-delta", "task-delta", 1, "delta", "verified"),
    ]
    for deployed in record.patches:
        assert deployed.digest == registry.resolve(deployed.ref).digest
        assert registry.resolve(f"{deployed.name}@{deployed.digest}").version == deployed.version
    on_disk = json.loads((tmp_path / "out" / "deployment.json").read_text())
    assert on_disk["patches"] == [p.model_dump() for p in record.patches]
    for shard in report.shard_files:  # every shard carries the record, so a copied shard still knows
        with safe_open(tmp_path / "out" / shard, "pt") as handle:
            assert json.loads(handle.metadata()["splice_deployment"])["patches"] == on_disk["patches"]
    (tmp_path / "out" / "deployment.json").unlink()
    assert read_deployment_record(tmp_path / "out") == record
    assert read_deployment_record(base_dir) is None


def test_wrong_base_is_refused_before_anything_is_written(setup, tmp_path):
    base_dir, _, registry = setup
    other = save(tiny_model("bert", 5), tmp_path / "other", sharded=False)
    with pytest.raises(PatchError, match="not the base this layernorm patch was made for"):
        deploy(["task-ln@prod"], other, tmp_path / "out", registry=registry, device="cpu")
    assert not (tmp_path / "out").exists()
    record, _ = deploy(
        ["task-ln@prod"], other, tmp_path / "out", registry=registry, device="cpu", allow_base_drift=True
    )
    (deployed,) = record.patches
    assert deployed.base_check.startswith("drift allowed: ") and deployed.base_check.endswith(" tensors differ")


def test_unknown_refs_are_refused_before_anything_is_written(setup, tmp_path):
    base_dir, _, registry = setup
    for ref in ("nope", "task-ln@7", "task-ln@staging", "Bad/Name"):
        with pytest.raises(SpliceError):
            deploy(["task-ln", ref], base_dir, tmp_path / "out", registry=registry, device="cpu")
        assert not (tmp_path / "out").exists()


def test_a_ref_patches_a_live_model_and_comes_off_again(setup, tmp_path):
    base_dir, tuned_dir, registry = setup
    model = model_class("bert").from_pretrained(base_dir).eval()
    tuned = model_class("bert").from_pretrained(tuned_dir).eval()
    inputs = example_inputs("bert")
    with torch.no_grad():
        before = model(**inputs).logits
        first = apply_ref(model, "task-ln@prod", registry=registry)
        second = apply_ref(model, "task-delta@1", registry=registry.url)
        torch.testing.assert_close(model(**inputs).logits, tuned(**inputs).logits, rtol=0, atol=1e-5)
        second.remove()
        first.remove()
        assert torch.equal(model(**inputs).logits, before)


def test_cli_deploy_and_inspect_show_the_record(setup, tmp_path, monkeypatch, capsys):
    base_dir, _, registry = setup
    monkeypatch.setenv("SPLICE_REGISTRY", registry.url)
    code, out, err = run_cli(
        ["deploy", "task-ln@prod", "task-delta", "--base", base_dir, "--out", tmp_path / "out", "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "task-ln@1" in out and "verified" in out
    code, out, err = run_cli(["inspect", tmp_path / "out"], monkeypatch, capsys)
    assert code == 0, err
    assert "deployed patches" in out and "task-delta@1" in out
    code, _, err = run_cli(
        ["deploy", "task-ln@prod", "--base", tmp_path / "missing", "--out", tmp_path / "o2"], monkeypatch, capsys
    )
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()
