"""PortLLM porting: a patch made on an old base carried onto an evolved base, checked against independent
computations from the patch files themselves (safetensors + numpy), against `patch apply`, and against peft."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import splice
from splice.adapters.drift import percent
from splice.adapters.extract import extract_patch_to
from splice.adapters.patch import Patch
from splice.errors import PatchError, SpliceError
from splice.registry.store import Registry

from conftest import perturbed, save, tiny_model
from helpers import load_dir, run_cli

KINDS = {"lora": {"rank": 3}, "delta": {}, "mask": {"density": 0.3}, "layernorm": {}}


def evolved(model: torch.nn.Module, seed: int, scale: float = 0.002) -> torch.nn.Module:
    """A 'continually pretrained' base: every float parameter moved by seeded noise."""
    return perturbed(model, seed, scale)


def lineage_setup(tmp_path: Path, arch: str, sharded: bool = True) -> tuple[Path, Path, Path]:
    """(old base v1, a full fine-tune of it, the evolved base v2)."""
    base = tiny_model(arch, 0)
    return (
        save(base, tmp_path / "v1", sharded),
        save(perturbed(base, 1, 0.05), tmp_path / "tuned", False),
        save(evolved(base, 7), tmp_path / "v2", sharded),
    )


def independent_update(patch_dir: Path, old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The change a patch makes on its own base, from its files alone (no splice code)."""
    meta = json.loads((patch_dir / "patch.json").read_text())
    tensors = load_file(patch_dir / "tensors.safetensors")
    kind, settings = meta["kind"], meta["settings"]
    if kind == "delta":
        return tensors
    if kind == "layernorm":
        return {name: value - old[name] for name, value in tensors.items()}
    if kind == "lora":
        return {
            f"{module}.weight": (settings["alpha"][module] / rank)
            * tensors[f"{module}.lora_B"].double()
            @ tensors[f"{module}.lora_A"].double()
            for module, rank in settings["rank"].items()
        }
    updates = {}  # mask: bits little-endian within each byte, values in index order
    for name, shape in settings["shapes"].items():
        bits = np.unpackbits(tensors[name + ".mask"].numpy(), bitorder="little")[: math.prod(shape)].astype(bool)
        dense = np.zeros(math.prod(shape), dtype=np.float32)
        dense[bits] = tensors[name + ".values"].numpy()
        updates[name] = torch.from_numpy(dense.reshape(shape))
    return updates


def assert_ported(out: dict, new: dict, update: dict, scale: float) -> None:
    assert out.keys() == new.keys()
    for name, value in new.items():
        expected = value.double() + scale * update[name].double() if name in update else value.double()
        torch.testing.assert_close(out[name].double(), expected, rtol=0, atol=1e-6, msg=name)
    assert sum(not torch.equal(out[n], new[n]) for n in update) >= len(update) // 2


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_port_equals_new_base_plus_scaled_update(kind, arch, tmp_path):
    v1, tuned, v2 = lineage_setup(tmp_path, arch)
    extract_patch_to(tmp_path / "patch", v1, tuned, kind, **KINDS[kind])
    update = independent_update(tmp_path / "patch", load_dir(v1))
    result = splice.port_patch(tmp_path / "patch", v2, out=tmp_path / "out", old_base=v1, scale=0.5, device="cpu")
    assert_ported(load_dir(tmp_path / "out"), load_dir(v2), update, 0.5)
    report = json.loads((tmp_path / "out" / "port_report.json").read_text())
    assert (tmp_path / "out" / "port_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {t["name"] for t in report["per_tensor"]} == set(update) and report["verdict"] == result.drift.verdict
    if kind == "layernorm":
        assert "ported as the change it made on its own base" in report["notes"][0]


def test_drift_figures_equal_an_independent_computation(tmp_path):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama")
    extract_patch_to(tmp_path / "patch", v1, tuned, "delta")
    old, new, update = load_dir(v1), load_dir(v2), independent_update(tmp_path / "patch", load_dir(v1))
    drift = splice.port_patch(tmp_path / "patch", v2, as_patch=tmp_path / "ported", old_base=v1).drift
    for entry in drift.tensors:
        change, u = (new[entry.name] - old[entry.name]).double(), update[entry.name].double()
        assert entry.base_change == pytest.approx(float(change.norm() / old[entry.name].double().norm()), rel=1e-9)
        # products are summed per row in fp32 (then in fp64): compared absolutely on the cosine's [-1, 1] scale,
        # at fp32's resolution (a cosine near 0 has few significant digits in any precision)
        assert entry.cosine == pytest.approx(float((change * u).sum() / (change.norm() * u.norm())), abs=1e-7)
        assert entry.update_to_change == pytest.approx(float(u.norm() / change.norm()), rel=1e-9)
    total_change = math.sqrt(sum(float((new[n] - old[n]).double().norm()) ** 2 for n in update))
    total_old = math.sqrt(sum(float(old[n].double().norm()) ** 2 for n in update))
    assert drift.base_change == pytest.approx(total_change / total_old, rel=1e-9)
    assert drift.verdict == "expected to transfer" and f"moved {percent(drift.base_change)} in" in drift.reason
    # without the old base: only the norms the fingerprint recorded, a lower bound of the change
    unmeasured = splice.port_patch(tmp_path / "patch", v2, as_patch=tmp_path / "ported2").drift
    assert unmeasured.base_change is None and unmeasured.verdict == "unmeasured"
    assert 0 < unmeasured.base_change_at_least <= drift.base_change * 1.0000001


@pytest.mark.parametrize("kind", list(KINDS))
def test_port_onto_its_own_base_equals_patch_apply(kind, tmp_path):
    v1, tuned, _ = lineage_setup(tmp_path, "llama")
    extract_patch_to(tmp_path / "patch", v1, tuned, kind, **KINDS[kind])
    result = splice.port_patch(tmp_path / "patch", v1, out=tmp_path / "ported", old_base=v1)
    splice.apply_patches([tmp_path / "patch"], v1, tmp_path / "applied")
    ported, applied = load_dir(tmp_path / "ported"), load_dir(tmp_path / "applied")
    assert all(torch.equal(ported[n], applied[n]) for n in applied) and ported.keys() == applied.keys()
    assert result.drift.verdict == "unchanged"


@pytest.mark.parametrize("kind", ["lora", "layernorm", "mask"])
def test_as_patch_then_apply_equals_port_out_and_fingerprints_the_new_base(kind, tmp_path):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama")
    extract_patch_to(tmp_path / "patch", v1, tuned, kind, **KINDS[kind])
    splice.port_patch(
        tmp_path / "patch", v2, out=tmp_path / "out", as_patch=tmp_path / "ported", old_base=v1, scale=0.7
    )
    code = splice.apply_patches([tmp_path / "ported"], v2, tmp_path / "applied")
    assert code.tensors > 0
    out, applied = load_dir(tmp_path / "out"), load_dir(tmp_path / "applied")
    assert all(torch.equal(out[n], applied[n]) for n in out)
    ported = Patch.load(tmp_path / "ported")
    assert ported.check_base(splice.Checkpoint.open(v2)) == []
    with pytest.raises(PatchError, match="is not the base this"):
        ported.check_base(splice.Checkpoint.open(v1))
    assert ported.meta.lineage[-1].startswith(f"ported from {tmp_path / 'patch'} (base digest sha256:")
    assert ported.meta.lineage[-1].endswith(f"onto base digest {ported.meta.base.digest}, scale 0.7")


@pytest.mark.parametrize("kind", list(KINDS))
def test_port_over_fsspec_memory_equals_the_independent_computation(kind, tmp_path):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama")
    extract_patch_to(tmp_path / "patch", v1, tuned, kind, **KINDS[kind])
    memory = fsspec.filesystem("memory")
    root = f"/port-{kind}"
    for directory in (v1, v2, tmp_path / "patch"):
        for file in directory.iterdir():
            memory.pipe(f"{root}/{directory.name}/{file.name}", file.read_bytes())
    try:
        splice.port_patch(
            f"memory:/{root}/patch",
            f"memory:/{root}/v2",
            out=tmp_path / "remote",
            old_base=f"memory:/{root}/v1",
            scale=1.5,
        )
    finally:
        memory.rm(root, recursive=True)
    update = independent_update(tmp_path / "patch", load_dir(v1))
    assert_ported(load_dir(tmp_path / "remote"), load_dir(v2), update, 1.5)


def test_a_refused_port_on_the_command_line_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama", sharded=False)
    extract_patch_to(tmp_path / "ln", v1, tuned, "layernorm")
    code, out, err = run_cli(["port", tmp_path / "ln", "--to", v2, "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: this patch is a LayerNorm patch") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(["port", tmp_path / "ln", "--to", v2], monkeypatch, capsys)
    assert code == 2 and "say where the port goes" in err


def test_peft_lora_adapter_ports_like_merge_and_unload_plus_the_base_change(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", 0)
    v1 = save(base, tmp_path / "v1", sharded=True)
    v2_model = evolved(base, 3)
    v2 = save(v2_model, tmp_path / "v2", sharded=True)
    adapter = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    adapter.save_pretrained(tmp_path / "adapter")
    merged = adapter.merge_and_unload().state_dict()
    splice.port(str(tmp_path / "adapter"), v2, tmp_path / "out", old_base=v1)
    out, old, new = load_dir(tmp_path / "out"), base.state_dict(), v2_model.state_dict()
    for name, value in out.items():
        torch.testing.assert_close(value, merged[name] + (new[name] - old[name]), rtol=0, atol=1e-6, msg=name)
    assert sum(not torch.equal(out[n], new[n]) for n in out) == 6  # 2 layers x q, v, up


def test_bad_ports_are_refused_in_one_line_and_write_nothing(tmp_path):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama", sharded=False)
    extract_patch_to(tmp_path / "lora", v1, tuned, "lora", rank=2)
    extract_patch_to(tmp_path / "ln", v1, tuned, "layernorm")
    extract_patch_to(tmp_path / "prune", v1, tuned, "mask", density=0.5, mask_values=False)
    bert = save(tiny_model("bert", 0), tmp_path / "bert", sharded=False)
    state = load_file(v2 / "model.safetensors")
    lacking = tmp_path / "lacking"
    shutil.copytree(v2, lacking)
    save_file(
        {n: t for n, t in state.items() if n != "model.layers.1.self_attn.q_proj.weight"},
        lacking / "model.safetensors",
        metadata={"format": "pt"},
    )
    reshaped = save(tiny_model("llama", 0).__class__(_wider(tiny_model("llama", 0).config)), tmp_path / "wide", False)
    cases = [
        (tmp_path / "lora", bert, {}, "has none of the 16 tensors the lora patch changes"),
        (
            tmp_path / "lora",
            lacking,
            {},
            "lacks 1 of the tensors the lora patch changes (model.layers.1.self_attn.q_proj.weight)",
        ),
        (tmp_path / "lora", reshaped, {}, "reshaped 6 of the tensors the lora patch changes"),
        (tmp_path / "ln", v2, {}, "is a LayerNorm patch: it stores the values it sets, not a change; give the base"),
        (tmp_path / "prune", v2, {"old_base": v1}, "only prunes"),
        (tmp_path / "lora", v2, {"old_base": v2}, "is not the base this lora patch was made for"),
        (tmp_path / "lora", v2, {"scale": 0.0}, "`scale` must be a finite number other than 0"),
        (tmp_path / "lora", v2, {"scale": float("nan")}, "`scale` must be a finite number other than 0"),
    ]
    for patch, to, extra, message in cases:
        with pytest.raises(SpliceError) as caught:
            splice.port_patch(patch, to, out=tmp_path / "out", as_patch=tmp_path / "ported", **extra)
        assert message in str(caught.value) and len(str(caught.value).splitlines()) == 1, str(caught.value)
        assert not (tmp_path / "out").exists() and not (tmp_path / "ported").exists()


def _wider(config):
    config = copy.deepcopy(config)
    config.intermediate_size += 8
    return config


def test_port_from_the_registry_pushes_records_health_and_scores(tmp_path, monkeypatch, capsys):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama")
    extract_patch_to(tmp_path / "patch", v1, tuned, "lora", rank=2)
    registry = tmp_path / "registry"
    Registry.init(registry).push("chat", tmp_path / "patch", alias="prod")
    scorer = tmp_path / "score.py"
    scorer.write_text("def score(state):\n    return float(state['model.layers.0.self_attn.q_proj.weight'].sum())\n")
    code, out, err = run_cli(
        [
            "port",
            "chat@prod",
            "--to",
            v2,
            "--from",
            v1,
            "--push",
            "chat-v2",
            "--alias",
            "prod",
            "--eval",
            f"{scorer}:score",
            "--registry",
            registry,
            "--as-patch",
            tmp_path / "ported",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    said = " ".join(out.split())  # tables wrap at the terminal's width
    assert "pushed chat-v2@1" in said and "│ verdict │ expected to" in said
    store = Registry.open(registry)
    pushed = store.load("chat-v2@prod")
    assert pushed.meta.lineage[-1].startswith("ported from chat@1 (base digest ")
    q = "model.layers.0.self_attn.q_proj.weight"
    applied_old = load_dir(v1)[q].double() + independent_update(tmp_path / "patch", load_dir(v1))[q]
    assert pushed.meta.metrics["score_before_port"] == pytest.approx(float(applied_old.sum()), rel=1e-5)
    code, _, err = run_cli(
        [
            "deploy",
            "chat@prod",
            "--base",
            v2,
            "--port",
            "--from",
            v1,
            "--out",
            tmp_path / "dep",
            "--registry",
            registry,
            "-q",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert (
        json.loads((tmp_path / "dep" / "deployment.json").read_text())["patches"][0]["base_check"]
        == "ported: expected to transfer"
    )
    assert (tmp_path / "dep" / "port_report.json").exists()
    splice.deploy(["chat-v2@prod"], v2, tmp_path / "dep2", registry=registry)
    records, problems = store.health("chat")
    assert [(r.event, r.base, r.drift.verdict) for r in records] == [("port", str(v2), "expected to transfer")] * 2
    assert records[0].ported_to == "chat-v2@1" and records[0].score_after is not None and not problems
    assert records[0].drift.base_change == pytest.approx(store_drift(tmp_path / "ported"), rel=1e-9)
    [deployed], _ = store.health("chat-v2")
    assert (deployed.event, deployed.base_check, deployed.base_digest) == (
        "deploy",
        "verified",
        pushed.meta.base.digest,
    )
    code, out, _ = run_cli(["registry", "show", "chat", "--registry", registry], monkeypatch, capsys)
    assert code == 0 and "health of chat" in out and out.count("ported:") == 2, out


def store_drift(ported_dir: Path) -> float:
    return json.loads((ported_dir / "port_report.json").read_text())["base_change"]


def test_report_directories_and_deploy_options_are_checked_before_any_work(tmp_path):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama", sharded=False)
    extract_patch_to(tmp_path / "lora", v1, tuned, "lora", rank=2)
    (tmp_path / "a-file").write_text("")
    for report, message in ((tmp_path / "a-file", "`report_dir`"), (v2, "`report_dir`"), (v1, "`report_dir`")):
        with pytest.raises(SpliceError, match=message) as caught:
            splice.port(str(tmp_path / "lora"), v2, tmp_path / "out", old_base=v1, report_dir=report)
        assert len(str(caught.value).splitlines()) == 1 and not (tmp_path / "out").exists()
    assert sorted(p.name for p in v2.iterdir()) == sorted(p.name for p in v1.iterdir())  # no report in a base
    registry = tmp_path / "registry"
    Registry.init(registry).push("lo", tmp_path / "lora")
    with pytest.raises(PatchError, match="`old_base` .* is for `port=True`"):
        splice.deploy(["lo"], v2, tmp_path / "dep", registry=registry, old_base=v1)
    with pytest.raises(PatchError, match="choose one"):
        splice.deploy(["lo"], v2, tmp_path / "dep", registry=registry, port=True, allow_base_drift=True)
    assert not (tmp_path / "dep").exists() and Registry.open(registry).health("lo") == ([], [])
