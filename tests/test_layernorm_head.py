"""LayerNorm patches of a classifier's fine-tune (issue 16 item 13): LayerNorm tuning trains the classification
head too, so the patch carries the changed head (found from the architecture), `--include PATTERN` carries other
changed tensors a user names, and one warning line says what changed but was left out."""

from __future__ import annotations

import fnmatch

import pytest
import torch
import transformers

from splice.adapters.apply import apply_patches
from splice.adapters.extract import extraction
from splice.adapters.patch import Patch

from conftest import TINY_DECODER, save, tiny_model
from helpers import load_dir, run_cli


def classifier(arch: str) -> torch.nn.Module:
    """A tiny ...ForSequenceClassification / ...ForImageClassification model."""
    if arch in ("bert", "vit"):
        return tiny_model(arch, 0)
    torch.manual_seed(0)
    if arch == "llama":
        return transformers.LlamaForSequenceClassification(
            transformers.LlamaConfig(**TINY_DECODER, num_labels=3, pad_token_id=0)
        )
    return transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(
            vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=3, pad_token_id=0
        )
    )


# what transformers' classes add to their base model: the head, written out by hand
HEADS = {
    "bert": ["classifier.bias", "classifier.weight"],
    "vit": ["classifier.bias", "classifier.weight"],
    "llama": ["score.weight"],
    "gpt2": ["score.weight"],
}
# a changed tensor that is neither a norm nor the head, per architecture
OTHERS = {
    "bert": ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "bert.embeddings.token_type_embeddings.weight"],
    "vit": ["vit.embeddings.cls_token"],
    "llama": ["model.layers.0.self_attn.q_proj.weight"],
    "gpt2": ["transformer.wpe.weight"],
}


def ln_tuned(base: torch.nn.Module, also: list[str]) -> torch.nn.Module:
    """The base with its norms, its head and `also` (stored names) changed."""
    tuned = type(base)(base.config)
    tuned.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            stored = name.replace("vit.layers.", "vit.encoder.layer.")  # only its norms matter here
            if "norm" in name.lower() or name in also or stored in also or name.startswith(("classifier", "score")):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return tuned


@pytest.mark.parametrize("arch", list(HEADS))
def test_the_changed_head_is_carried_and_what_is_left_out_is_said(arch, tmp_path):
    base = classifier(arch)
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(ln_tuned(base, OTHERS[arch]), tmp_path / "tuned", sharded=False)
    before, after = load_dir(base_dir), load_dir(tuned_dir)
    changed = sorted(n for n in after if not torch.equal(after[n], before[n]))
    assert set(HEADS[arch]) | set(OTHERS[arch]) <= set(changed)

    found = extraction(base_dir, tuned_dir, "layernorm", device="cpu")
    patch = found.patch
    assert set(HEADS[arch]) <= set(patch.tensors)
    assert sorted(set(changed) - set(patch.tensors)) == sorted(OTHERS[arch])
    assert patch.meta.settings["head"] == HEADS[arch]
    assert sorted(patch.meta.settings["left_out"]) == sorted(OTHERS[arch])
    assert len(found.warnings) == 1 and "\n" not in found.warnings[0]
    assert found.warnings[0].startswith(f"{len(OTHERS[arch])} changed tensors are not in the layernorm patch")
    assert OTHERS[arch][0] in found.warnings[0] and "--include PATTERN" in found.warnings[0]

    apply_patches([patch], base_dir, tmp_path / "out", device="cpu")
    out = load_dir(tmp_path / "out")
    for name in out:
        assert torch.equal(out[name], before[name] if name in OTHERS[arch] else after[name]), name


def test_include_carries_named_tensors_and_the_cli_warns_in_one_line(tmp_path, monkeypatch, capsys):
    base = classifier("bert")
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(ln_tuned(base, OTHERS["bert"]), tmp_path / "tuned", sharded=False)
    before, after = load_dir(base_dir), load_dir(tuned_dir)
    extract = ["patch", "extract", "--base", base_dir, "--tuned", tuned_dir, "--kind", "layernorm", "--device", "cpu"]

    code, _, err = run_cli([*extract, "--out", tmp_path / "plain"], monkeypatch, capsys)
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "3 changed tensors are not in the layernorm patch" in warning[0], err

    # the pooler by a pattern, the token type embedding by name: everything the fine-tune changed is carried
    code, out, err = run_cli(
        [
            *extract,
            "--include",
            "bert.pooler.*",
            "--include",
            "bert.embeddings.token_type_embeddings.weight",
            "--out",
            tmp_path / "ln",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "warning" not in err and "layernorm patch" in out
    patch = Patch.load(tmp_path / "ln")
    assert patch.meta.settings["included"] == sorted(OTHERS["bert"])
    assert not patch.meta.settings.get("left_out")
    code, _, err = run_cli(
        [
            "patch",
            "apply",
            tmp_path / "ln",
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
    out_state = load_dir(tmp_path / "out")
    for name in out_state:
        assert torch.equal(out_state[name], after[name]), name
    # an unchanged tensor a pattern names is not carried
    assert not any(fnmatch.fnmatch(n, "bert.pooler.*") and torch.equal(before[n], after[n]) for n in patch.tensors)

    code, _, err = run_cli([*extract, "--include", "bert.pooller.*", "--out", tmp_path / "typo"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--include 'bert.pooller.*' names no tensor of" in err and not (tmp_path / "typo").exists()
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
            "--include",
            "bert.pooler.*",
            "--out",
            tmp_path / "d",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "include is an option of layernorm patches" in err and not (tmp_path / "d").exists()


def test_an_unchanged_head_is_not_carried(tmp_path):
    from test_live_patch import norms_only_fine_tune

    base = classifier("bert")
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(norms_only_fine_tune(base, 1), tmp_path / "tuned", sharded=False)
    found = extraction(base_dir, tuned_dir, "layernorm", device="cpu")
    assert not any(name.startswith("classifier") for name in found.patch.tensors)
    assert found.warnings == [] and "left_out" not in found.patch.meta.settings


def test_a_layernorm_patch_with_its_head_exports_to_a_peft_adapter_peft_merges_alike(tmp_path):
    from test_peft_interop import peft_loads_cleanly, quietly, states_close

    from splice.adapters.export import export_peft

    base = classifier("bert")
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(ln_tuned(base, []), tmp_path / "tuned", sharded=False)
    extraction(base_dir, tuned_dir, "layernorm", device="cpu").patch.save(tmp_path / "ln")
    export_peft(tmp_path / "ln", tmp_path / "adapter", base=base_dir)
    merged = quietly(peft_loads_cleanly(base, tmp_path / "adapter").merge_and_unload)
    apply_patches([tmp_path / "ln"], base_dir, tmp_path / "out", device="cpu")
    states_close(load_dir(tmp_path / "out"), load_dir(save(merged, tmp_path / "merged", sharded=False)))
    states_close(load_dir(tmp_path / "out"), load_dir(tuned_dir), atol=0)
