"""Patch files and base fingerprints (the foundation of issue 3's patches and registry)."""

from __future__ import annotations

import hashlib
import json

import fsspec
import pytest
import torch
from safetensors.torch import load_file

from splice.adapters.fingerprint import fingerprint_base
from splice.adapters.kinds.spec import scale_tensors
from splice.adapters.lazy import LazyTensors
from splice.adapters.patch import MANIFEST, TENSORS, Patch, PatchError, PatchKind, PatchMeta
from splice.errors import OutputExistsError
from splice.tensors.checkpoint import Checkpoint

from conftest import perturbed, save, tiny_model

NORMS = [
    "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias",
    "bert.encoder.layer.0.output.LayerNorm.weight",
]


@pytest.fixture
def base_dir(tmp_path):
    return save(tiny_model("bert", 0), tmp_path / "base", sharded=True)


def make_patch(base_dir) -> Patch:
    base = Checkpoint.open(base_dir)
    tensors = {name: base.read(name) * 1.5 for name in NORMS}
    meta = PatchMeta(
        kind=PatchKind.layernorm,
        targets=sorted({n.rpartition(".")[0] for n in NORMS}),
        base=fingerprint_base(base, NORMS),
        metrics={"accuracy": 0.91},
        tags=["task-1"],
    )
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


def test_lazy_tensor_mappings_stay_lazy_and_read_all_at_once(base_dir, tmp_path):
    """A stored patch's tensors and a rescaled patch's computed ones are LazyTensors: a Patch keeps them unread
    (shapes known without reading a value); a plain dict is held as it is."""
    patch = make_patch(base_dir)
    stored = Patch.load(patch.save(tmp_path / "p"))
    scaled, _ = scale_tensors(stored, 2.0, {NORMS[0]})
    for tensors in (stored.tensors, scaled):
        assert isinstance(tensors, LazyTensors)
        lazy = Patch(tensors, patch.meta)
        assert lazy.tensors is tensors and lazy.shapes == patch.shapes
        assert lazy.in_memory().tensors.keys() == tensors.read_all().keys() == patch.tensors.keys()
    assert torch.equal(scaled.read_all()[NORMS[0]], 2.0 * patch.tensors[NORMS[0]])
    assert not isinstance(patch.tensors, LazyTensors) and isinstance(patch.tensors, dict)


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
    assert "`allow_base_drift=True`" in message
    mismatches = patch.check_base(Checkpoint.open(drifted_dir), allow_drift=True)
    assert [(m.name, m.reason) for m in mismatches] == [("bert.embeddings.LayerNorm.weight", "values")]


def test_a_base_of_another_shape_or_without_the_tensors_is_refused(base_dir, tmp_path):
    patch = make_patch(base_dir)
    other = save(perturbed(tiny_model("gpt2", 0), 1), tmp_path / "gpt2", sharded=False)
    mismatches = patch.check_base(Checkpoint.open(other), allow_drift=True)
    assert {m.reason for m in mismatches} == {"missing"}
    bert_floats = [name for name, info in Checkpoint.open(base_dir).tensors.items() if info.dtype.is_floating_point]
    assert sorted(m.name for m in mismatches) == sorted(bert_floats)  # its own tensors and the base's others


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda d: (d / MANIFEST).unlink(), "no patch.json"),
        (lambda d: (d / MANIFEST).write_text("{not json"), "patch.json"),
        (lambda d: (d / TENSORS).unlink(), "tensors.safetensors is missing"),
        (
            lambda d: (d / MANIFEST).write_text(json.dumps({**json.loads((d / MANIFEST).read_text()), "surprise": 1})),
            "surprise",
        ),
        (
            lambda d: (d / MANIFEST).write_text(
                json.dumps({**json.loads((d / MANIFEST).read_text()), "format_version": 99})
            ),
            "upgrade splice",
        ),
        (lambda d: (d / TENSORS).write_bytes((d / TENSORS).read_bytes()[:-5]), "truncated"),
    ],
)
def test_a_damaged_patch_is_a_one_line_error(damage, needle, base_dir, tmp_path):
    make_patch(base_dir).save(tmp_path / "p")
    damage(tmp_path / "p")
    with pytest.raises(PatchError) as caught:
        Patch.load(tmp_path / "p")
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def _drifted(base_dir, tmp_path, change) -> Checkpoint:
    drifted = tiny_model("bert", 0)
    with torch.no_grad():
        change(drifted)
    return Checkpoint.open(save(drifted, tmp_path / "drifted", sharded=False))


def test_a_drift_refusal_counts_only_the_tensors_the_patch_changes(base_dir, tmp_path):
    from splice.adapters.fingerprint import compare_fingerprint, refuse_drift

    patch = make_patch(base_dir)
    stored = _drifted(base_dir, tmp_path, lambda model: model.bert.embeddings.LayerNorm.weight.mul_(1.1))
    gone = [name for name in stored.tensors if name not in NORMS][:4]  # base tensors the patch does not change

    def source(name):
        info = stored.tensors.get(name)
        if name in gone or info is None:
            return None
        return info.shape, info.dtype, lambda sample=False: stored.read(name)

    mismatches = compare_fingerprint(patch.meta.base, source)
    assert [m.name for m in mismatches if m.own] == ["bert.embeddings.LayerNorm.weight"]
    with pytest.raises(PatchError) as caught:
        refuse_drift(mismatches, "the base", "layernorm", "`allow_base_drift=True`")
    message = str(caught.value)
    assert "more of the tensors it changes" not in message and "4 other tensors differ" in message
    assert "\n" not in message and "`allow_base_drift=True`" in message


def test_a_norm_that_does_not_move_is_said_so_not_shown_as_zero_percent(base_dir, tmp_path):
    name = "bert.encoder.layer.0.attention.self.query.weight"
    fingerprint = fingerprint_base(Checkpoint.open(base_dir), [name])
    patch = Patch({name: torch.zeros(16, 16)}, PatchMeta(kind=PatchKind.delta, targets=[name], base=fingerprint))
    # the rows of the matrix in reverse order: other values, the same norm
    stored = _drifted(
        base_dir,
        tmp_path,
        lambda model: model.bert.encoder.layer[0].attention.self.query.weight.copy_(
            model.bert.encoder.layer[0].attention.self.query.weight.flip(0)
        ),
    )
    with pytest.raises(PatchError) as caught:
        patch.check_base(stored)
    message = str(caught.value)
    assert f"{name}: values differ" in message and "(the same norm, other values)" in message
    assert "0.00%" not in message and "`allow_base_drift=True`" in message


def test_a_base_without_the_tensors_the_patch_changes_is_told_so_not_offered_the_override(base_dir, tmp_path):
    from splice.adapters.apply import apply_patches
    from splice.adapters.live import apply_patch

    from conftest import model_class

    patch = make_patch(base_dir)
    other_dir = save(perturbed(tiny_model("gpt2", 0), 1), tmp_path / "gpt2", sharded=False)
    with pytest.raises(PatchError) as caught:
        patch.check_base(Checkpoint.open(other_dir))
    message = str(caught.value)
    assert "\n" not in message and "is not the base this layernorm patch was made for" in message
    assert f"it lacks 3 of the tensors the patch changes ({', '.join(sorted(NORMS))})" in message
    assert "allow-base-drift" not in message and "other tensors differ" not in message
    with pytest.raises(PatchError, match="has no tensor"):  # the override would not have helped
        apply_patches([patch], other_dir, tmp_path / "out", device="cpu", allow_base_drift=True)
    with pytest.raises(PatchError, match=r"it lacks 3 of the tensors the patch changes") as caught:
        apply_patch(model_class("gpt2").from_pretrained(other_dir), patch)
    assert "allow_base_drift" not in str(caught.value)


def test_every_patch_kind_has_one_row_in_the_kinds_table():
    from dataclasses import fields

    from splice.adapters.kinds import KINDS

    assert set(KINDS) == set(PatchKind)
    for spec in KINDS.values():
        names = {f.name for f in fields(spec.options)} if spec.options else set()
        assert set(spec.keywords.values()) == names  # every option reachable by its keyword
