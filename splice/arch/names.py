"""Between the tensor names stored on disk and the names of a loaded transformers model's state dict.

transformers 5 renames some architectures' modules at load time and reverts the renaming when saving
(a ViT file holds `vit.encoder.layer.0.attention.attention.query.weight`, the module is
`vit.layers.0.attention.q_proj`). splice works on stored names; this maps them onto a live model.
"""

from __future__ import annotations

import torch

from splice.errors import SpliceError


def stored_to_module_names(model: torch.nn.Module) -> dict[str, str]:
    """{name save_pretrained would write: name in model.state_dict()}, from transformers' own save-time
    reversal run on one distinct marker per tensor."""
    from transformers.core_model_loading import revert_weight_conversion

    names = list(model.state_dict())
    markers = {name: torch.tensor(float(i)) for i, name in enumerate(names)}
    # transformers annotates PreTrainedModel, but it only walks the module tree (any Module will do)
    reverted = revert_weight_conversion(model, markers)  # type: ignore[arg-type]
    mapping = {stored: names[int(marker.item())] for stored, marker in reverted.items()}
    if sorted(mapping.values()) != sorted(names):
        raise SpliceError(f"{type(model).__name__}: transformers' save-time conversion is not a one-to-one renaming")
    return mapping
