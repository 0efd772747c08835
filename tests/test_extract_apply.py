"""Extract LayerNorm and delta patches from a fine-tune and apply them back onto the base, streamed."""

from __future__ import annotations

import pytest
import torch

from splice.adapters.apply import apply_patches
from splice.adapters.extract import extract_patch
from splice.adapters.patch import Patch, PatchError

from conftest import model_class, perturbed, save, tiny_model
from helpers import load_dir


@pytest.fixture
def pair(tmp_path):
    base = tiny_model("llama", 0)
    return save(base, tmp_path / "base", sharded=True), save(perturbed(base, 3), tmp_path / "tuned", sharded=False)


def test_layernorm_patch_carries_exactly_the_tuned_norms(pair, tmp_path):
    base_dir, tuned_dir = pair
    patch = extract_patch(base_dir, tuned_dir, "layernorm")
    tuned, base = load_dir(tuned_dir), load_dir(base_dir)
    norms = sorted(n for n in tuned if "norm" in n)
    assert sorted(patch.tensors) == norms  # input/post-attention layernorms of both layers and the final norm
    patch.save(tmp_path / "ln")
    apply_patches([tmp_path / "ln"], base_dir, tmp_path / "out", device="cpu")
    out = load_dir(tmp_path / "out")
    for name in base:
        assert torch.equal(out[name], tuned[name] if name in norms else base[name]), name


def test_delta_patch_reproduces_the_fine_tune(pair, tmp_path):
    base_dir, tuned_dir = pair
    patch = extract_patch(base_dir, tuned_dir, "delta")
    apply_patches([patch], base_dir, tmp_path / "out", device="cpu")
    out, tuned = load_dir(tmp_path / "out"), load_dir(tuned_dir)
    for name in tuned:
        torch.testing.assert_close(out[name], tuned[name], rtol=0, atol=1e-6)
    reloaded, info = model_class("llama").from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_deltas_add_and_a_layernorm_replacement_on_a_delta_is_refused(pair, tmp_path):
    base_dir, tuned_dir = pair
    delta = extract_patch(base_dir, tuned_dir, "delta")
    half = Patch({n: t / 2 for n, t in delta.tensors.items()}, delta.meta)
    apply_patches([half, half], base_dir, tmp_path / "twice", device="cpu")
    out, tuned = load_dir(tmp_path / "twice"), load_dir(tuned_dir)
    for name in tuned:
        torch.testing.assert_close(out[name], tuned[name], rtol=0, atol=1e-6)
    layernorm = extract_patch(base_dir, tuned_dir, "layernorm")
    with pytest.raises(PatchError, match="does not compose"):
        apply_patches([delta, layernorm], base_dir, tmp_path / "both", device="cpu")
    assert not (tmp_path / "both").exists()


def test_wrong_base_is_refused_before_anything_is_written(pair, tmp_path):
    base_dir, tuned_dir = pair
    patch = extract_patch(base_dir, tuned_dir, "layernorm")
    # a fresh Llama's RMSNorm weights are all ones, like the base's: only a trained one differs there
    other = save(perturbed(tiny_model("llama", 9), 5), tmp_path / "other", sharded=False)
    with pytest.raises(PatchError, match="not the base"):
        apply_patches([patch], other, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    apply_patches([patch], other, tmp_path / "out", device="cpu", allow_base_drift=True)
    assert torch.equal(load_dir(tmp_path / "out")["model.norm.weight"], load_dir(tuned_dir)["model.norm.weight"])


def test_cli_extract_then_apply_and_a_refused_base(pair, tmp_path, monkeypatch, capsys):
    from helpers import run_cli

    base_dir, tuned_dir = pair
    code, out, err = run_cli(
        ["patch", "extract", "--base", base_dir, "--tuned", tuned_dir, "--kind", "layernorm", "--out", tmp_path / "ln"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "layernorm patch" in out
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
    assert torch.equal(load_dir(tmp_path / "out")["model.norm.weight"], load_dir(tuned_dir)["model.norm.weight"])

    code, _, err = run_cli(
        ["patch", "apply", tmp_path / "ln", "--base", tuned_dir, "--out", tmp_path / "wrong", "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert code == 2 and err.startswith("error:") and "not the base" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "wrong").exists()
    code, _, err = run_cli(
        ["patch", "extract", "--base", base_dir, "--tuned", tuned_dir, "--kind", "nonsense", "--out", tmp_path / "x"],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "unknown patch kind 'nonsense'" in err


def test_untouched_tensors_are_copied_in_the_kernel_locally_and_through_memory_remotely(pair, tmp_path, monkeypatch):
    import os

    import fsspec

    from splice.tensors.checkpoint import Checkpoint

    base_dir, tuned_dir = pair
    patch = extract_patch(base_dir, tuned_dir, "layernorm")
    untouched = [name for name in Checkpoint.open(base_dir).tensors if name not in patch.tensors]
    copies = []
    real_copy = os.copy_file_range

    def counting_copy(*args):
        copies.append(args[2])
        return real_copy(*args)

    monkeypatch.setattr(os, "copy_file_range", counting_copy)
    apply_patches([patch], base_dir, tmp_path / "local", device="cpu")
    assert sum(copies) == sum(Checkpoint.open(base_dir).tensors[name].nbytes for name in untouched)

    remote = fsspec.filesystem("memory")
    for path in base_dir.iterdir():
        remote.pipe(f"/deploy-base/{path.name}", path.read_bytes())
    copies.clear()
    apply_patches([patch], "memory://deploy-base", tmp_path / "remote", device="cpu")
    assert copies == []
    local, through_memory, base = load_dir(tmp_path / "local"), load_dir(tmp_path / "remote"), load_dir(base_dir)
    for name in base:
        expected = patch.tensors[name] if name in patch.tensors else base[name]
        assert torch.equal(local[name], expected) and torch.equal(through_memory[name], expected), name


@pytest.mark.parametrize(
    ("kind", "keywords", "option", "owner"),
    [
        ("layernorm", {"rank": 2}, "rank", "lora"),
        ("delta", {"density": 0.1}, "density", "mask"),
        ("lora", {"rank": 2, "mask_scope": "model"}, "mask_scope", "mask"),
        ("mask", {"density": 0.1, "rslora": True}, "rslora", "lora"),
    ],
)
def test_an_option_of_another_kind_is_refused_naming_it(pair, kind, keywords, option, owner):
    base_dir, tuned_dir = pair
    with pytest.raises(PatchError) as caught:
        extract_patch(base_dir, tuned_dir, kind, device="cpu", **keywords)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{option} is an option of {owner} patches, not of a {kind}")


def test_the_kind_options_come_as_an_object_or_as_keywords(pair, tmp_path):
    from splice.adapters.kinds.lora import LoraOptions
    from splice.adapters.kinds.mask import MaskOptions

    base_dir, tuned_dir = pair
    loose = extract_patch(base_dir, tuned_dir, "lora", rank=2, device="cpu")
    given = extract_patch(base_dir, tuned_dir, "lora", options=LoraOptions(rank=2), device="cpu")
    assert given.meta.settings == loose.meta.settings
    assert all(torch.equal(given.tensors[name], loose.tensors[name]) for name in loose.tensors)
    # what the CLI passes when a user leaves an option out: every kind's defaults, which change nothing
    defaults = {
        "rank": None,
        "energy": None,
        "rslora": False,
        "density": None,
        "mask_scope": "tensor",
        "mask_values": True,
        "include": (),
    }
    assert extract_patch(base_dir, tuned_dir, "layernorm", **defaults).meta.targets
    for call, needle in [
        (dict(kind="lora", options=MaskOptions(density=0.1)), "takes LoraOptions, not MaskOptions"),
        (dict(kind="lora", options=LoraOptions(rank=2), rank=3), "not both"),
        (dict(kind="delta", options=LoraOptions(rank=2)), "takes no options"),
        (dict(kind="lora", rnak=2), "no option 'rnak'"),
    ]:
        with pytest.raises(PatchError, match=needle) as caught:
            extract_patch(base_dir, tuned_dir, device="cpu", **call)
        assert "\n" not in str(caught.value)


class RecordingProgress:
    def __init__(self):
        self.phases: list[dict] = []

    def start(self, description, total_items, total_bytes, unit="tensors"):
        assert not self.phases or self.phases[-1]["finished"], "a phase started before the last one finished"
        self.phases.append(
            {"description": description, "total": (total_items, total_bytes), "done": [0, 0], "finished": False}
        )

    def advance(self, items, nbytes):
        self.phases[-1]["done"][0] += items
        self.phases[-1]["done"][1] += nbytes

    def finish(self):
        self.phases[-1]["finished"] = True


@pytest.mark.parametrize(
    ("kind", "keywords", "comparisons"),
    [
        # layernorm compares too: what changed besides the norms (a classification head) is found
        ("layernorm", {}, 1),
        ("delta", {}, 1),
        ("lora", {"rank": 2}, 1),
        ("mask", {"density": 0.1}, 1),
        ("mask", {"density": 0.1, "mask_scope": "model"}, 2),
    ],
)
def test_extraction_reports_progress_for_every_pass(pair, kind, keywords, comparisons):
    base_dir, tuned_dir = pair
    progress = RecordingProgress()
    extract_patch(base_dir, tuned_dir, kind, device="cpu", progress=progress, **keywords)
    assert [p["description"] for p in progress.phases] == (
        ["comparing the fine-tune with its base"] * comparisons + ["fingerprinting the base"]
    )
    for phase in progress.phases:
        assert phase["finished"] and tuple(phase["done"]) == phase["total"] and phase["total"][0] > 0


def test_cli_extract_shows_progress_and_refuses_an_existing_output_before_reading(pair, tmp_path, monkeypatch, capsys):
    from splice.adapters.extract import extract_patch_to
    from splice.errors import OutputExistsError

    from helpers import run_cli

    base_dir, tuned_dir = pair
    code, _, err = run_cli(
        ["patch", "extract", "--base", base_dir, "--tuned", tuned_dir, "--kind", "delta", "--out", tmp_path / "d"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "comparing the fine-tune with its base" in err and "fingerprinting the base" in err
    with pytest.raises(OutputExistsError):
        extract_patch_to(tmp_path / "d", tmp_path / "no-such-base", tuned_dir, "delta")
    extracted = extract_patch_to(tmp_path / "d", base_dir, tuned_dir, "lora", force=True, rank=2, device="cpu")
    assert Patch.load(tmp_path / "d").meta.kind.value == "lora"
    assert extracted.warnings and "delta or layernorm patch" in extracted.warnings[0]
