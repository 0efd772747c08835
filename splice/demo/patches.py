"""Patches end to end on the digits task: a LoRA + LayerNorm fine-tune, its patches extracted, pushed to
a registry, deployed onto the base and checked against the fine-tune. Used by `splice demo`."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from splice.adapters.extract import extract_patch
from splice.adapters.patch import PatchError
from splice.arch.quiet import quiet_transformers
from splice.demo import digits
from splice.progress import Progress
from splice.registry.store import Registry
from splice.workflows.deploy import deploy

LORA_TARGETS = ("q_proj", "v_proj")  # attention query and value projections, as LoRA's authors chose


class LowRankUpdate(torch.nn.Module):
    """weight -> weight + B @ A: the base weight stays frozen, only A and B train (B starts at zero)."""

    def __init__(self, rows: int, cols: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.lora_A = torch.nn.Parameter(torch.randn(rank, cols, generator=generator) / cols**0.5)
        self.lora_B = torch.nn.Parameter(torch.zeros(rows, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.lora_B @ self.lora_A


def lora_layernorm_finetune(
    base_dir: Path,
    out_dir: Path,
    splits: digits.DigitsSplits,
    *,
    rank: int = 4,
    steps: int = 150,
    lr: float = 3e-3,
    seed: int = 7,
) -> Path:
    """Fine-tune only low-rank updates of the attention query/value weights and the LayerNorms; save the
    merged model. Its change from the base is exactly a LoRA patch plus a LayerNorm patch."""
    model = digits.load_model(base_dir)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    targets = [
        module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in LORA_TARGETS
    ]
    for module in targets:
        rows, cols = module.weight.shape
        parametrize.register_parametrization(module, "weight", LowRankUpdate(rows, cols, rank, generator))
    for layer in model.modules():
        if isinstance(layer, torch.nn.LayerNorm):
            layer.requires_grad_(True)
    digits.train(model, splits.finetune, lr=lr, steps=steps, seed=seed, weight_decay=0.0)
    for module in targets:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    with quiet_transformers():
        model.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def max_logit_difference(model_a: Path, model_b: Path, pixels: torch.Tensor) -> float:
    first, second = digits.load_model(model_a), digits.load_model(model_b)
    return float((first(pixel_values=pixels).logits - second(pixel_values=pixels).logits).abs().max())


def run_patch_study(
    workdir: Path,
    base_dir: Path,
    wrong_base_dir: Path,
    splits: digits.DigitsSplits,
    progress: Progress | None = None,
    rank: int = 4,
) -> dict:
    """Fine-tune LoRA + LayerNorm on `base_dir`, extract both patches, push them to a registry under
    `workdir`, deploy them onto the base, compare with the fine-tune, and try the wrong base."""
    started = time.perf_counter()
    tuned_dir = lora_layernorm_finetune(base_dir, workdir / "lora-ln-finetune", splits, rank=rank)
    layernorm = extract_patch(base_dir, tuned_dir, "layernorm", description="digits LayerNorms")
    lora = extract_patch(base_dir, tuned_dir, "lora", rank=rank, description="digits attention LoRA")
    registry = Registry.init(str(workdir / "registry"))
    pushed = [
        registry.push(name, patch, alias="prod").manifest
        for name, patch in (("digits-ln", layernorm), ("digits-lora", lora))
    ]
    refs = ["digits-ln@prod", "digits-lora@prod"]
    deployed_dir = workdir / "deployed"
    record, _ = deploy(refs, base_dir, deployed_dir, registry=registry, device="cpu", progress=progress)
    try:
        deploy(refs, wrong_base_dir, workdir / "refused", registry=registry, device="cpu")
        refusal = None
    except PatchError as exc:
        refusal = str(exc)
    probe = splits.test.x
    return {
        "patches": [
            {
                "ref": f"{version.name}@{version.version}",
                "kind": patch.meta.kind.value,
                "digest": version.digest,
                "parameters": patch.num_parameters,
            }
            for version, patch in zip(pushed, (layernorm, lora))
        ],
        "record": record,
        "accuracy": {
            name: digits.accuracy(digits.load_model(path), *splits.test)
            for name, path in (("base", base_dir), ("fine-tune", tuned_dir), ("deployed", deployed_dir))
        },
        "max_logit_difference": max_logit_difference(tuned_dir, deployed_dir, probe),
        "probe_count": len(probe),
        "refusal": refusal,
        "wrote_refused_output": (workdir / "refused").exists(),
        "seconds": time.perf_counter() - started,
    }
