"""Device and dtype policy: compute in fp32 (fp64 stays fp64), write in the requested dtype."""

from __future__ import annotations

import torch

from splice.errors import SpliceError

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' means cuda when a GPU is visible, else cpu. Asking for cuda without one is an error."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SpliceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpliceError(
            f"device {name!r} requested but no CUDA GPU is visible: use `device='cpu'` or `device='auto'`"
        )
    return device


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise SpliceError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The working precision for a stored float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
