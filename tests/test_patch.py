"""Patch files and base fingerprints (the foundation of issue 3's patches and registry)."""

from __future__ import annotations

import hashlib
import json

import fsspec
import pytest
import torch
from safetensors.torch import load_file

from splice.adapters.fingerprint import fingerprint_base
from splice.adapters.patch import MANIFEST, TENSORS, Patch, PatchError, PatchKind, PatchMeta
from splice.errors import OutputExistsError
from splice.tensors.checkpoint import Checkpoint

from conftest import perturbed, save, tiny_model

NORMS = ["bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias",
         "bert.encoder.layer.0.output.LayerNorm.weight"]


@pytest.fixture
def base_dir(tmp_path):
    return save(tiny_model("bert", 0), tmp_path / "base", sharded=True)


def make_patch(base_dir) -> Patch:
    base = Checkpoint.open(base_dir)
    tensors = {name: base.read(name) * 1.5 for name in NORMS}
    meta = PatchMeta(kind=PatchKind.layernorm, targets=sorted({n.rpartition(".")[0] for n in NORMS}),
                     base=fingerprint_base(base, NORMS), metrics={"accuracy": 0.91}, tags=["task-1"])
    return Patch(tensors, meta)


def test_fingerprint_hashes_the_stored_bytes(base_dir):
    stored = {}
    for shard in sorted(base_dir.glob("*.safetensors")):
        stored.update(load_file(shard))
    fingerprint = fingerprint_base(Checkpoint.open(base_dir), NORMS)
    assert [e.name for e in fingerprint.tensors] == sorted(NORMS)
    for entry in fingerprint.tensors:
        tensor = stored[entry.name]
        assert entry.sha256 == hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
        assert entry.shape == tuple(tensor.shape) and entry.dtype == "float32"
        assert entry.norm == pytest.approx(float(tensor.double().norm()), rel=1e-12)
    assert fingerprint.digest.startswith("sha256:")
    assert fingerprint_base(Checkpoint.open(base_dir), list(reversed(NORMS))).digest == fingerprint.digest


def test_save_and_load_round_trip_locally_and_over_fsspec(base_dir, tmp_path):
    patch = make_patch(base_dir)
    patch.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [MANIFEST, TENSORS]
    assert load_file(tmp_path / "p" / TENSORS).keys() == patch.tensors.keys()
    memory = fsspec.filesystem("memory")
    for name in (MANIFEST, TENSORS):
        memory.pipe(f"/patches/p/{name}", (tmp_path / "p" / name).read_bytes())
    for location in (tmp_path / "p", "memory://patches/p"):
        loaded = Patch.load(location)
        assert loaded.meta == patch.meta
        assert all(torch.equal(loaded.tensors[n], patch.tensors[n]) for n in NORMS)
    with pytest.raises(OutputExistsError):
        patch.save(tmp_path / "p")


def test_the_same_base_passes_and_a_drifted_base_is_refused_with_how_much(base_dir, tmp_path):
    patch = make_patch(base_dir)
    assert patch.check_base(Checkpoint.open(base_dir)) == []
    drifted = tiny_model("bert", 0)
    with torch.no_grad():
        drifted.bert.embeddings.LayerNorm.weight.mul_(1.1)
    drifted_dir = save(drifted, tmp_path / "drifted", sharded=False)
    with pytest.raises(PatchError) as caught:
        patch.check_base(Checkpoint.open(drifted_dir))
    message = str(caught.value)
    assert "\n" not in message and "bert.embeddings.LayerNorm.weight" in message and "+10.00%" in message
    assert "--allow-base-drift" in message
    mismatches = patch.check_base(Checkpoint.open(drifted_dir), allow_drift=True)
    assert [(m.name, m.reason) for m in mismatches] == [("bert.embeddings.LayerNorm.weight", "values")]


def test_a_base_of_another_shape_or_without_the_tensors_is_refused(base_dir, tmp_path):
    patch = make_patch(base_dir)
    other = save(perturbed(tiny_model("gpt2", 0), 1), tmp_path / "gpt2", sharded=False)
    mismatches = patch.check_base(Checkpoint.open(other), allow_drift=True)
    assert {m.reason for m in mismatches} == {"missing"}
    bert_floats = [name for name, info in Checkpoint.open(base_dir).tensors.items() if info.dtype.is_floating_point]
    assert sorted(m.name for m in mismatches) == sorted(bert_floats)  # its own tensors and the base's others


@pytest.mark.parametrize("damage,needle", [
    (lambda d: (d / MANIFEST).unlink(), "no patch.json"),
    (lambda d: (d / MANIFEST).write_text("{not json"), "patch.json"),
    (lambda d: (d / TENSORS).unlink(), "tensors.safetensors is missing"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({**json.loads((d / MANIFEST).read_text()), "surprise": 1})),
     "surprise"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({**json.loads((d / MANIFEST).read_text()),
                                                     "format_version": 99})), "upgrade splice"),
    (lambda d: (d / TENSORS).write_bytes((d / TENSORS).read_bytes()[:-5]), "truncated"),
])
def test_a_damaged_patch_is_a_one_line_error(damage, needle, base_dir, tmp_path):
    make_patch(base_dir).save(tmp_path / "p")
    damage(tmp_path / "p")
    with pytest.raises(PatchError) as caught:
        Patch.load(tmp_path / "p")
    assert needle in str(caught.value) and "\n" not in str(caught.value)
