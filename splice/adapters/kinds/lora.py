"""LoRA patches: low-rank factors per matrix, extracted from a fine-tune's deltas by truncated SVD.

Storage (names are the base's stored tensor names, in its stored layout): for a base tensor
`<module>.weight` of stored shape [rows, cols] a patch holds `<module>.lora_A` [r, cols] and
`<module>.lora_B` [rows, r]; the change is `scale * lora_B @ lora_A`, scale = alpha / r, or alpha / sqrt(r)
with rsLoRA. GPT-2's Conv1D stores [in, out]: in splice's format that is simply the stored layout (only PEFT
import/export transposes). A patch imported from PEFT may also carry whole tensors that replace the base's
(PEFT's `modules_to_save` and trained biases), stored under their own names and listed in `replaced`.

`PatchMeta.settings` of a LoRA patch:
    rslora          bool, scale = alpha / sqrt(r) instead of alpha / r
    rank            {module: r}
    alpha           {module: alpha}; extraction sets alpha = r, so the standard scale is 1 and rsLoRA's sqrt(r)
    replaced        [tensor names] applied as replacements (PEFT imports only)
extraction adds:
    requested       {"rank": R or None, "energy": E or None}
    captured_energy {module: share of the delta's squared Frobenius norm the factors keep}
    relative_error  {module: ||delta - scale B A||_F / ||delta||_F}
    left_out        {tensor: why}: changed tensors LoRA cannot carry (biases, norms, convolutions);
                    a delta or layernorm patch carries them
    svd             {module: "full" or "randomized"}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from splice.adapters.deltas import Extracted, deltas, left_out_warnings
from splice.adapters.kinds.spec import KindSpec, describe_plain
from splice.adapters.steps import Effect, PatchContents, Step, replace_step, rows_of
from splice.errors import PatchError
from splice.progress import Progress
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import resolve_device

SUFFIX_A = ".lora_A"
SUFFIX_B = ".lora_B"

# Randomized SVD for matrices whose smaller side exceeds this, when the kept rank is at most a
# RANDOMIZED_FRACTION of it; otherwise a full SVD (exact, and fast enough for small matrices).
RANDOMIZED_MIN_DIM = 1024
RANDOMIZED_FRACTION = 0.25
OVERSAMPLE = 10
POWER_ITERATIONS = 4
ENERGY_START_RANK = 32  # randomized energy mode: first guess, doubled until the share is reached


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_modules(patch: PatchContents) -> list[str]:
    """The modules a LoRA patch holds factors for, in storage order."""
    shapes = patch.shapes
    modules = [name[: -len(SUFFIX_A)] for name in shapes if name.endswith(SUFFIX_A)]
    for name in shapes:
        if name.endswith(SUFFIX_B) and name[: -len(SUFFIX_B)] + SUFFIX_A not in shapes:
            raise PatchError(f"LoRA patch has {name} but no {name[: -len(SUFFIX_B)] + SUFFIX_A}")
    return modules


def module_scale(patch: PatchContents, module: str) -> float:
    """alpha / r (or alpha / sqrt(r)) of one module, checked against its factors' shapes."""
    settings = patch.meta.settings
    shape_a, shape_b = patch.shapes[module + SUFFIX_A], patch.shapes.get(module + SUFFIX_B)
    if shape_b is None:
        raise PatchError(f"LoRA patch has {module}{SUFFIX_A} but no {module}{SUFFIX_B}")
    if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != shape_b[1]:
        raise PatchError(
            f"LoRA patch: {module} has factors of shapes {list(shape_b)} and {list(shape_a)}, which do not multiply"
        )
    rank = settings.get("rank", {}).get(module, shape_a[0])
    if rank != shape_a[0]:
        raise PatchError(f"LoRA patch: {module} records rank {rank} but its factors have rank {shape_a[0]}")
    alpha = settings.get("alpha", {}).get(module)
    if alpha is None:
        raise PatchError(f"LoRA patch: no alpha recorded for {module} in patch.json settings")
    return lora_scale(float(alpha), rank, bool(settings.get("rslora", False)))


def lora_steps(patch: PatchContents) -> dict[str, Step]:
    """`<module>.weight` -> add scale * B @ A (factors read when the step runs); replaced tensors -> replace.
    A tensor both replaced and LoRA-adapted (PEFT saves embedding layers whole next to their LoRA factors)
    becomes the stored value plus the product: a replacement."""
    steps: dict[str, Step] = {}
    shapes = patch.shapes
    replaced = list(patch.meta.settings.get("replaced", []))
    for name in replaced:
        if name not in shapes:
            raise PatchError(f"LoRA patch lists {name} as replaced but holds no such tensor")
    for module in lora_modules(patch):
        scale = module_scale(patch, module)
        rows, cols = shapes[module + SUFFIX_B][0], shapes[module + SUFFIX_A][1]
        start = f"{module}.weight" if f"{module}.weight" in replaced else None

        def compute(
            value: torch.Tensor,
            block: tuple[int, int] | None = None,
            *,
            module: str = module,
            scale: float = scale,
            start: str | None = start,
        ) -> torch.Tensor:
            """The weight, or rows `block` of it: rows of W (or of the stored start) plus those rows of B times A."""
            if start is not None:
                value = rows_of(patch.tensors[start], block).to(device=value.device, dtype=value.dtype, copy=True)
            a = patch.tensors[module + SUFFIX_A].to(device=value.device, dtype=value.dtype)
            b = rows_of(patch.tensors[module + SUFFIX_B], block).to(device=value.device, dtype=value.dtype)
            return value.addmm_(b, a, alpha=scale)  # in place: no new tensor of the weight's size

        if start is not None and tuple(shapes[start]) != (rows, cols):
            raise PatchError(f"LoRA patch: {start} is {list(shapes[start])} but its factors make {[rows, cols]}")
        steps[f"{module}.weight"] = Step(Effect.replace if start else Effect.add, (rows, cols), compute, compute)
    for name in replaced:
        if name not in steps:
            steps[name] = replace_step(patch, name)
    return steps


# -- extraction --------------------------------------------------------------------------------------


def _keep_for_energy(squares: torch.Tensor, total: float, energy: float, cap: int) -> int:
    """Smallest k <= cap whose leading squared singular values reach `energy` of `total` (cap if none does)."""
    reached = torch.nonzero(torch.cumsum(squares.double(), 0) >= energy * total)
    return min(int(reached[0]) + 1, cap) if len(reached) else min(cap, len(squares))


def check_request(rank: int | None, energy: float | None) -> None:
    if rank is None and energy is None:
        raise PatchError("a LoRA patch needs `rank=R`, `energy=E`, or both (rank then caps the energy rank)")
    if rank is not None and rank < 1:
        raise PatchError(f"`rank` must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise PatchError(f"`energy` must be in (0, 1], e.g. 0.9; got {energy}")


@dataclass(frozen=True)
class LoraOptions:
    """`rank` of every matrix, or per matrix the smallest rank keeping `energy` of its delta (`rank` then caps
    it); `rslora` scales by alpha / sqrt(rank)."""

    rank: int | None = None
    energy: float | None = None
    rslora: bool = False

    def __post_init__(self) -> None:
        check_request(self.rank, self.energy)


def truncated_svd(
    delta: torch.Tensor, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U [rows, k], S [k], Vh [k, cols], method): the leading k singular triplets of a 2-D fp32 matrix, k set
    by `rank` (capped at min(rows, cols)) or by `energy` (the smallest rank keeping that share of
    ||delta||_F^2, with `rank` as a cap). Large matrices with a small kept rank use a randomized SVD; the
    squared Frobenius norm is known exactly, so the captured share is exact for the factors returned."""
    check_request(rank, energy)
    small = min(delta.shape)
    cap = small if rank is None else min(rank, small)
    total = float(delta.double().square().sum())
    randomized_limit = int(small * RANDOMIZED_FRACTION)
    if small > RANDOMIZED_MIN_DIM and (energy is not None or cap <= randomized_limit):
        guess = cap if energy is None else min(cap, ENERGY_START_RANK)
        while guess <= randomized_limit:
            q = min(guess + OVERSAMPLE, small)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=POWER_ITERATIONS)
            keep = guess if energy is None else _keep_for_energy(s.square(), total, energy, guess)
            reached = energy is None or float(s[:keep].double().square().sum()) >= energy * total
            if reached or keep >= cap:
                return u[:, :keep], s[:keep], v[:, :keep].T, "randomized"
            guess = min(guess * 2, cap)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = cap if energy is None else _keep_for_energy(s.square(), total, energy, cap)
    return u[:, :keep], s[:keep], vh[:keep], "full"


def product_svd(
    b: torch.Tensor, a: torch.Tensor, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(U, S, Vh, ||b @ a||_F^2): `truncated_svd` of the product b @ a (b [rows, r], a [r, cols]) without forming
    it: with b = Qb Rb and a^T = Qa Ra, b @ a = Qb (Rb Ra^T) Qa^T, so the SVD of the small core Rb Ra^T (at most
    r x r) rotated by Qb and Qa is the product's, in O((rows + cols) r^2); the core's Frobenius norm is the
    product's, so the captured energy is exact."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    core = rb @ ra.T
    total = float(core.double().square().sum())
    if total == 0:
        return qb[:, :0], core.new_zeros(0), qa.T[:0], 0.0
    u, s, vh, _ = truncated_svd(core, rank, energy)
    return qb @ u, s, vh @ qa.T, total


def balanced_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A = U diag(S) Vh, the singular values split evenly between them (scale 1: alpha = rank)."""
    root = s.sqrt()
    return (root[:, None] * vh).contiguous().cpu(), (u * root[None, :]).contiguous().cpu()


def _why_not_lora(name: str, delta: torch.Tensor) -> str | None:
    if delta.dim() != 2:
        return f"{delta.dim()}-D"
    if not name.endswith(".weight"):
        return "not a module weight"
    return None


def _factor(delta: torch.Tensor, options: LoraOptions) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(A, B, what the settings record of this matrix): singular values split evenly between the factors
    (B = U sqrt(S/scale), A = sqrt(S/scale) Vh), alpha = rank."""
    u, s, vh, method = truncated_svd(delta, options.rank, options.energy)
    keep = len(s)
    root = (s / lora_scale(float(keep), keep, options.rslora)).sqrt()
    total = float(delta.double().square().sum())
    captured = min(float(s.double().square().sum()) / total, 1.0)
    recorded = {
        "rank": keep,
        "alpha": keep,
        "captured_energy": captured,
        "relative_error": math.sqrt(max(1.0 - captured, 0.0)),
        "svd": method,
    }
    return (root[:, None] * vh).contiguous().cpu(), (u * root[None, :]).contiguous().cpu(), recorded


def extract_lora(
    base: Checkpoint, tuned: Checkpoint, options: LoraOptions, device: str = "auto", progress: Progress | None = None
) -> Extracted:
    """A LoRA patch of every changed matrix (`<module>.weight`, 2-D, embeddings and heads included): a
    truncated SVD of tuned - base. Changed tensors that are not matrices are listed in `left_out`, and said so."""
    tensors: dict[str, torch.Tensor] = {}
    settings: dict = {
        "rslora": options.rslora,
        "rank": {},
        "alpha": {},
        "requested": {"rank": options.rank, "energy": options.energy},
        "captured_energy": {},
        "relative_error": {},
        "svd": {},
        "left_out": {},
    }
    for name, delta in deltas(base, tuned, resolve_device(device), progress):
        why = _why_not_lora(name, delta)
        if why is not None:
            settings["left_out"][name] = why
            continue
        module = name[: -len(".weight")]
        tensors[module + SUFFIX_A], tensors[module + SUFFIX_B], recorded = _factor(delta, options)
        for key, value in recorded.items():
            settings[key][module] = value
    left_out = settings["left_out"]
    if not tensors:
        raise PatchError(
            f"{tuned.location}: no changed matrix to factor"
            + (
                f" ({len(left_out)} changed tensors are not matrices); try `kind='delta'`"
                if left_out
                else f"; it is identical to {base.location}"
            )
        )
    warnings = left_out_warnings(
        left_out, "LoRA patch", "not being matrices", "carry them with a delta or layernorm patch"
    )
    modules = list(settings["rank"])
    return Extracted(tensors, [f"{m}.weight" for m in modules], modules, settings, warnings)


def describe_lora(settings: dict[str, Any]) -> str:
    """Rank(s), rsLoRA, the worst relative error and what was left out, in one line."""
    if not isinstance(settings.get("rank"), dict):
        return describe_plain(settings)
    ranks = sorted(set(settings["rank"].values()))
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    parts = [f"rank {rank} on {len(settings['rank'])} matrices", f"rsLoRA {'yes' if settings.get('rslora') else 'no'}"]
    errors: dict[str, float] = settings.get("relative_error") or {}
    if errors:
        worst = max(errors, key=errors.__getitem__)
        parts.append(f"relative error of the delta at most {errors[worst]:.2g} ({worst})")
    if settings.get("left_out"):
        parts.append(f"{len(settings['left_out'])} changed tensors left out (not matrices)")
    return "; ".join(parts)


def rescale_lora(patch: PatchContents, scale: float) -> tuple[Any, dict[str, Any]]:
    """The same factors with every alpha times `scale` (so the product is `scale` times as large)."""
    settings = dict(patch.meta.settings)
    settings["alpha"] = {module: float(alpha) * scale for module, alpha in settings.get("alpha", {}).items()}
    return patch.tensors, settings


SPEC = KindSpec(
    extract=extract_lora,
    steps=lora_steps,
    describe=describe_lora,
    rescale=rescale_lora,
    options=LoraOptions,
    keywords={"rank": "rank", "energy": "energy", "rslora": "rslora"},
)
