"""PEFT adapters made by the real peft library, applied by splice; splice patches exported for peft to load."""

from __future__ import annotations

import copy
import json
import warnings
from fractions import Fraction

import pytest
import torch
from peft import IA3Config, LNTuningConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_lora import low_rank_fine_tune

from splice.adapters.apply import apply_patches
from splice.adapters.export import export_peft
from splice.adapters.extract import extract_patch
from splice.adapters.live import apply_patch
from splice.adapters.patch import Patch, PatchError, PatchKind
from splice.adapters.peft.read import load_peft_adapter
from splice.adapters.sources import load_patch
from splice.tensors.checkpoint import Checkpoint

from conftest import model_class, save, tiny_model
from helpers import load_dir, run_cli

# arch -> LoraConfig arguments; module names are those transformers 5 loads (ViT's differ from its stored ones)
LORA_CASES = {
    "bert": dict(target_modules=["query", "value", "word_embeddings"], task_type="SEQ_CLS"),  # + classifier
    "vit": dict(
        target_modules=["q_proj", "fc1"],
        rank_pattern={"fc1": 2},
        alpha_pattern={"layers.1.attention.q_proj": 3},
        use_rslora=True,
    ),
    "gpt2": dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, alpha_pattern={"c_proj": 5}),
    "llama": dict(target_modules=["q_proj", "down_proj", "lm_head"], rank_pattern={"down_proj": 3}, use_rslora=True),
}


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def peft_lora(arch: str, base: torch.nn.Module, **overrides) -> PeftModel:
    arguments = dict(r=4, lora_alpha=8, init_lora_weights=False) | LORA_CASES[arch] | overrides
    return quietly(get_peft_model, copy.deepcopy(base), LoraConfig(**arguments))


def states_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=atol, msg=name)


def changed(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> int:
    return sum(not torch.equal(state[n], base[n]) for n in base)


def one_line(exc: pytest.ExceptionInfo) -> bool:
    return len(str(exc.value).strip().splitlines()) == 1


def peft_loads_cleanly(base: torch.nn.Module, adapter_dir) -> PeftModel:
    """peft's own loader: no missing or unexpected adapter keys, no warnings about them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir)
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    probe = quietly(PeftModel.from_pretrained, copy.deepcopy(base), adapter_dir)
    result = quietly(probe.load_adapter, adapter_dir, adapter_name="probe")
    assert not result.missing_keys and not result.unexpected_keys
    return loaded


@pytest.mark.parametrize("arch", list(LORA_CASES))
def test_peft_lora_adapter_applied_streamed_and_live_equals_merge_and_unload(arch, tmp_path):
    base = tiny_model(arch, 0)
    base_dir = save(base, tmp_path / "base", sharded=arch == "llama")
    adapter = peft_lora(arch, base)
    adapter.save_pretrained(tmp_path / "adapter")
    merged = quietly(adapter.merge_and_unload)
    merged_dir = save(merged, tmp_path / "merged", sharded=False)

    apply_patches([tmp_path / "adapter"], base_dir, tmp_path / "out", device="cpu")
    out, expected = load_dir(tmp_path / "out"), load_dir(merged_dir)
    states_close(out, expected)
    assert changed(out, load_dir(base_dir)) >= 4

    patch = load_patch(tmp_path / "adapter", base=Checkpoint.open(base_dir))
    assert patch.meta.kind is PatchKind.lora and patch.meta.base is None
    if arch == "vit":  # the adapter's live names became stored names
        assert any(t.startswith("vit.encoder.layer.") for t in patch.meta.targets)
    if arch == "bert":
        assert sorted(patch.meta.settings["replaced"]) == ["classifier.bias", "classifier.weight"]

    cls = model_class(arch)
    live = cls.from_pretrained(base_dir)
    original = {n: t.clone() for n, t in live.state_dict().items()}
    handle = apply_patch(live, tmp_path / "adapter")
    states_close(live.state_dict(), merged.state_dict())
    handle.remove()
    assert all(torch.equal(original[n], t) for n, t in live.state_dict().items())


def test_adapter_name_segments_and_pickled_weights_are_read(tmp_path):
    base = tiny_model("llama", 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    adapter = peft_lora("llama", base)
    adapter.save_pretrained(tmp_path / "plain")
    adapter.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    expected = load_dir(save(quietly(adapter.merge_and_unload), tmp_path / "merged", sharded=False))

    # keys written with the adapter's name in them, as some tools do
    named = tmp_path / "named"
    named.mkdir()
    (named / "adapter_config.json").write_text((tmp_path / "plain" / "adapter_config.json").read_text())
    state = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    save_file(
        {
            k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
            for k, v in state.items()
        },
        named / "adapter_model.safetensors",
    )
    apply_patches([named], base_dir, tmp_path / "out-named", device="cpu")
    states_close(load_dir(tmp_path / "out-named"), expected)

    assert (tmp_path / "pickled" / "adapter_model.bin").exists()
    apply_patches([tmp_path / "pickled"], base_dir, tmp_path / "out-pickled", device="cpu")
    states_close(load_dir(tmp_path / "out-pickled"), expected)

    torch.save({"weight": Fraction(1, 2)}, tmp_path / "pickled" / "adapter_model.bin")  # not plain tensors
    with pytest.raises(PatchError, match="refused or unreadable") as caught:
        apply_patches([tmp_path / "pickled"], base_dir, tmp_path / "out-bad", device="cpu")
    assert one_line(caught) and not (tmp_path / "out-bad").exists()


@pytest.mark.parametrize(
    "arch,targets",
    [("llama", ["input_layernorm", "norm"]), ("vit", ["layernorm_before", "layernorm_after", "layernorm"])],
)
def test_peft_ln_tuning_adapter_equals_merge_and_unload(arch, targets, tmp_path):
    base = tiny_model(arch, 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    adapter = quietly(get_peft_model, copy.deepcopy(base), LNTuningConfig(target_modules=targets))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "ln_tuning_layers" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    adapter.save_pretrained(tmp_path / "adapter")
    merged = quietly(adapter.merge_and_unload)
    expected = load_dir(save(merged, tmp_path / "merged", sharded=False))

    apply_patches([tmp_path / "adapter"], base_dir, tmp_path / "out", device="cpu")
    out = load_dir(tmp_path / "out")
    states_close(out, expected)
    assert changed(out, load_dir(base_dir)) >= 3
    assert load_patch(tmp_path / "adapter").meta.kind is PatchKind.layernorm

    live = model_class(arch).from_pretrained(base_dir)
    with apply_patch(live, tmp_path / "adapter"):
        states_close(live.state_dict(), merged.state_dict())


def ranks_by_index(index: int, shape: tuple[int, ...]) -> int:
    return 1 + index % 3


@pytest.mark.parametrize("arch,rslora", [("bert", False), ("vit", True), ("gpt2", False), ("llama", True)])
def test_exported_lora_patch_loads_in_peft_and_merges_to_splices_result(arch, rslora, tmp_path):
    base = tiny_model(arch, 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(low_rank_fine_tune(base, 3, ranks_by_index), tmp_path / "tuned", sharded=False)
    # energy mode on deltas of ranks 1-3 keeps each one's own rank: ranks and alphas differ by module
    patch = extract_patch(base_dir, tuned_dir, "lora", energy=0.999999, rslora=rslora, device="cpu")
    assert len(set(patch.meta.settings["rank"].values())) > 1
    patch.save(tmp_path / "lora")
    export_peft(tmp_path / "lora", tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is rslora
    assert config["rank_pattern"] and config["alpha_pattern"]
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["base_model_name_or_path"] == str(base_dir)

    loaded = peft_loads_cleanly(base, tmp_path / "exported")
    merged = load_dir(save(quietly(loaded.merge_and_unload), tmp_path / "merged", sharded=False))
    apply_patches([patch], base_dir, tmp_path / "ours", device="cpu")
    states_close(merged, load_dir(tmp_path / "ours"))

    back = load_peft_adapter(tmp_path / "exported", base=Checkpoint.open(base_dir))  # the round trip
    assert back.meta.settings["rank"] == patch.meta.settings["rank"]
    assert back.meta.settings["alpha"] == patch.meta.settings["alpha"]
    for name in patch.tensors:
        assert torch.equal(back.tensors[name], patch.tensors[name]), name


@pytest.mark.parametrize(
    "arch,overrides,saved",
    [
        ("bert", {"bias": "lora_only"}, ["classifier"]),  # a classifier head and the adapted modules' biases
        ("llama", {}, None),  # lm_head adapted: peft saves the embedding layers whole
    ],
)
def test_imported_adapter_with_whole_tensors_exports_again(arch, overrides, saved, tmp_path):
    base = tiny_model(arch, 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    adapter = peft_lora(arch, base, **overrides)
    with torch.no_grad():  # trained biases differ from the base's
        for name, parameter in adapter.named_parameters():
            if name.endswith("base_layer.bias"):
                parameter.add_(0.1)
    adapter.save_pretrained(tmp_path / "adapter")
    replaced = load_patch(tmp_path / "adapter").meta.settings["replaced"]
    assert replaced
    expected = load_dir(save(quietly(adapter.merge_and_unload), tmp_path / "merged", sharded=False))
    apply_patches([tmp_path / "adapter"], base_dir, tmp_path / "ours", device="cpu")
    states_close(load_dir(tmp_path / "ours"), expected)
    live = model_class(arch).from_pretrained(base_dir)
    export_peft(tmp_path / "adapter", tmp_path / "again", base=live)  # the live model names the modules
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == saved
    loaded = peft_loads_cleanly(base, tmp_path / "again")
    states_close(load_dir(save(quietly(loaded.merge_and_unload), tmp_path / "merged-again", sharded=False)), expected)
    assert sorted(load_patch(tmp_path / "again", base=live).meta.settings["replaced"]) == sorted(replaced)


@pytest.mark.parametrize("arch", ["llama", "vit"])
def test_exported_layernorm_patch_is_an_ln_tuning_adapter(arch, tmp_path):
    from test_live_patch import norms_only_fine_tune

    base = tiny_model(arch, 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(norms_only_fine_tune(base, 1), tmp_path / "tuned", sharded=False)
    patch = extract_patch(base_dir, tuned_dir, "layernorm")
    # weights only: the exported modules' biases come from the base
    weights = Patch({n: t for n, t in patch.tensors.items() if n.endswith(".weight")}, patch.meta)
    export_peft(weights, tmp_path / "exported", base=base_dir)
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING"
    loaded = peft_loads_cleanly(base, tmp_path / "exported")
    merged = load_dir(save(quietly(loaded.merge_and_unload), tmp_path / "merged", sharded=False))
    apply_patches([weights], base_dir, tmp_path / "ours", device="cpu")
    ours = load_dir(tmp_path / "ours")
    states_close(merged, ours)
    assert changed(ours, load_dir(base_dir)) == len(weights.tensors)


def test_unsupported_adapters_and_wrong_bases_are_refused_in_one_line(tmp_path):
    base = tiny_model("llama", 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    out = tmp_path / "out"

    peft_lora("llama", base, use_dora=True).save_pretrained(tmp_path / "dora")
    quietly(
        get_peft_model, copy.deepcopy(base), IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    ).save_pretrained(tmp_path / "ia3")
    vit = tiny_model("vit", 0)
    vit_dir = save(vit, tmp_path / "vit", sharded=False)
    quietly(
        get_peft_model, copy.deepcopy(vit), LoraConfig(r=2, target_modules=["projection"], init_lora_weights=False)
    ).save_pretrained(tmp_path / "conv")
    for adapter, base_of, message in [
        (tmp_path / "dora", base_dir, "DoRA"),
        (tmp_path / "ia3", base_dir, "IA3"),
        (tmp_path / "conv", vit_dir, "convolution"),
    ]:
        with pytest.raises(PatchError, match=message) as caught:
            apply_patches([adapter], base_of, out, device="cpu")
        assert one_line(caught) and not out.exists()

    # an adapter for another shape of model: refused by name mapping with a base, by shape without one
    bigger = type(base)(type(base.config)(**(base.config.to_dict() | {"intermediate_size": 32})))
    peft_lora("llama", bigger).save_pretrained(tmp_path / "bigger")
    with pytest.raises(PatchError, match="as shape") as caught:
        apply_patches([tmp_path / "bigger"], base_dir, out, device="cpu")
    assert one_line(caught) and not out.exists()
    with pytest.raises(PatchError, match="shape") as caught:
        apply_patches([load_peft_adapter(tmp_path / "bigger")], base_dir, out, device="cpu")
    assert one_line(caught) and not out.exists()
    with pytest.raises(PatchError, match="as shape") as caught:
        apply_patch(model_class("llama").from_pretrained(base_dir), tmp_path / "bigger")
    assert one_line(caught)

    # export: kinds PEFT cannot hold, bases that do not fit
    tuned_dir = save(low_rank_fine_tune(base, 2, 2), tmp_path / "tuned", sharded=False)
    delta = extract_patch(base_dir, tuned_dir, "delta")
    with pytest.raises(PatchError, match="no format for a delta patch") as caught:
        export_peft(delta, out)
    assert one_line(caught) and not out.exists()
    lora = extract_patch(base_dir, tuned_dir, "lora", rank=2, device="cpu")
    with pytest.raises(PatchError, match="does not have|as shape") as caught:
        export_peft(lora, out, base=vit_dir)
    assert one_line(caught) and not out.exists()
    orphan = Patch(lora.tensors, lora.meta.model_copy(update={"lineage": []}))
    with pytest.raises(PatchError, match="needs the base model") as caught:
        export_peft(orphan, out)
    assert one_line(caught) and not out.exists()


def test_cli_export_and_apply_a_peft_adapter(tmp_path, monkeypatch, capsys):
    base = tiny_model("gpt2", 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(low_rank_fine_tune(base, 6, 2), tmp_path / "tuned", sharded=False)
    code, _, err = run_cli(
        [
            "patch",
            "extract",
            "--base",
            base_dir,
            "--tuned",
            tuned_dir,
            "--kind",
            "lora",
            "--rank",
            "2",
            "--device",
            "cpu",
            "--out",
            tmp_path / "lora",
            "--quiet",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    code, out, err = run_cli(
        ["patch", "export", tmp_path / "lora", "--peft", "--out", tmp_path / "adapter"], monkeypatch, capsys
    )
    assert code == 0, err
    assert "PEFT adapter" in out
    loaded = peft_loads_cleanly(base, tmp_path / "adapter")
    merged = load_dir(save(quietly(loaded.merge_and_unload), tmp_path / "merged", sharded=False))

    code, _, err = run_cli(
        [
            "patch",
            "apply",
            tmp_path / "adapter",
            "--base",
            base_dir,
            "--out",
            tmp_path / "out",
            "--device",
            "cpu",
            "--quiet",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    states_close(load_dir(tmp_path / "out"), merged)
    states_close(load_dir(tmp_path / "out"), load_dir(tuned_dir), atol=1e-5)

    code, _, err = run_cli(["patch", "export", tmp_path / "lora", "--out", tmp_path / "nowhere"], monkeypatch, capsys)
    assert code == 2 and "--peft" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()
    code, _, err = run_cli(
        ["patch", "export", tmp_path / "lora", "--peft", "--out", tmp_path / "adapter"], monkeypatch, capsys
    )
    assert code == 2 and "already exists" in err
