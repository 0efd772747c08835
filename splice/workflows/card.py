"""What a merge output carries beside its tensors, so that it says how it was made: a model card (`README.md`, with
the YAML front matter the Hugging Face Hub reads), the recipe as run (`splice_recipe.yml`, which `splice merge`
runs again) and, where mergekit can run it, the same recipe as a mergekit config (`mergekit_config.yml`).

mergekit's card (mergekit/card.py) gives the method, the models and the config; this one adds each input's digest
(`splice.tensors.digest`), splice's version, the seed, the stages that made a multi-stage output's inputs, and says
why there is no mergekit config when there is none.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from splice.errors import RecipeError
from splice.merge.methods import mergekit_method, method_names
from splice.merge.recipe import Recipe
from splice.merge.reference_syntax import parse_reference
from splice.merge.references import map_model_references, model_references
from splice.version import __version__
from splice.workflows.references import recorded_hook, recorded_reference, recorded_statistics

CARD = "README.md"
RECIPE_AS_RUN = "splice_recipe.yml"
MERGEKIT_CONFIG = "mergekit_config.yml"

DIGEST_MEANING = (
    "A digest identifies an input's files as splice read them: the sha256 of each file's name, size and "
    "modification time and of every tensor's name, dtype, shape and place in its file (its safetensors header), "
    "not of the tensors' bytes; it changes whenever a file is written again."
)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?\Z")


@dataclass(frozen=True)
class MergeRecord:
    """One merge as run: its recipe (model references as opened, local paths absolute) and each input's digest."""

    recipe: Recipe
    digests: Mapping[str, str]  # input reference -> digest, in the recipe's input order
    seed: int | None = None
    name: str | None = None  # a stage's name


def recorded_recipe(recipe: Recipe) -> Recipe:
    """`recipe` with every model reference as `recorded_reference` keeps it, and each model's `stats:` and `mask:`
    directory and `data:` file absolute: runnable from any directory."""
    recipe = map_model_references(recipe, recorded_reference)
    if not any(entry.stats or entry.data or entry.mask for entry in recipe.models):
        return recipe
    models = [
        entry.model_copy(
            update={
                "stats": entry.stats and recorded_statistics(entry.stats),
                "mask": entry.mask and recorded_statistics(entry.mask),
                "data": entry.data and recorded_hook(entry.data),
            }
        )
        for entry in recipe.models
    ]
    return recipe.model_copy(update={"models": models})


def output_files(record: MergeRecord, title: str, earlier: Sequence[MergeRecord] = ()) -> dict[str, bytes]:
    """README.md (headed `title`), splice_recipe.yml and (where mergekit can run the recipe) mergekit_config.yml for
    an output made by `record`, whose inputs were made by the stages `earlier` (in the order they ran)."""
    config, why_not = mergekit_config(record.recipe)
    card = model_card(record, title, earlier, why_not)
    files = {CARD: card.encode(), RECIPE_AS_RUN: recipe_as_run(record).encode()}
    if config is not None:
        files[MERGEKIT_CONFIG] = config.encode()
    return files


def recipe_as_run(record: MergeRecord) -> str:
    seed = f" --seed {record.seed}" if record.seed is not None else ""
    return (
        f"# The recipe as splice {__version__} ran it; again: splice merge {RECIPE_AS_RUN} --out DIR{seed}\n"
        + _yaml(record.recipe.model_dump(mode="json", exclude_defaults=True))
    )


# mergekit 0.1.5's MergeConfiguration fields (a test holds this to mergekit's own): importing mergekit.config to ask it
# imports its architecture catalogue and transformers' model modules, ~4 s on every merge
MERGEKIT_CONFIG_KEYS = frozenset(
    {"base_model", "chat_template", "dtype", "merge_method", "models", "modules", "out_dtype", "parameters", "slices"}
    | {"tokenizer", "tokenizer_source"}
)
# splice's own settings of how a recipe runs, not of what it merges: left out of mergekit's config (`compute: mergekit`
# gives mergekit-yaml's output bit for bit; exact differs from it by its rounding only)
SPLICE_ONLY_KEYS = {"name", "compute"}


def mergekit_config(recipe: Recipe) -> tuple[str | None, str]:
    """(the recipe as a mergekit config, "") where mergekit's config language says all of it, else (None, why)."""
    data = recipe.model_dump(mode="json", exclude_defaults=True, exclude=SPLICE_ONLY_KEYS)
    unknown = sorted(set(data) - MERGEKIT_CONFIG_KEYS)
    if unknown:
        return None, f"mergekit's config has no {', '.join(unknown)}"
    if recipe.merge_method not in method_names():
        return None, f"mergekit has no merge method {recipe.merge_method}"
    remote = next((r for r in model_references(recipe) if "://" in r), None)
    if remote is not None:
        return None, f"mergekit cannot read {remote}"
    patched = next((r for r in model_references(recipe) if _adapter_is_a_splice_patch(r)), None)
    if patched is not None:
        return None, f"mergekit reads only PEFT adapters after `+`, and {patched} names a splice patch"
    return _yaml(data), ""


def _adapter_is_a_splice_patch(reference: str) -> bool:
    """Whether a reference's `+` part is a local splice patch directory (no adapter_config.json: not PEFT's)."""
    if os.path.exists(reference) or "+" not in reference:
        return False
    adapter = parse_reference(reference).adapter
    where = Path(adapter.path) if adapter is not None else None
    return where is not None and where.is_dir() and not (where / "adapter_config.json").is_file()


def model_card(
    record: MergeRecord, title: str, earlier: Sequence[MergeRecord] = (), no_mergekit_config: str = ""
) -> str:
    recipe = record.recipe
    hub_ids = _hub_ids([*earlier, record])
    splice: dict[str, Any] = {
        "version": __version__,
        "merge_method": recipe.merge_method,
        "inputs": [{"model": model, "digest": digest} for model, digest in record.digests.items()],
    }
    if record.seed is not None:
        splice["seed"] = record.seed
    front = {
        "base_model": hub_ids,
        **({"base_model_relation": "merge"} if hub_ids else {}),
        "library_name": "transformers",
        "tags": ["merge", "splice"],
        "splice": splice,
    }
    lines = [
        "---",
        _yaml(front).rstrip(),
        "---",
        f"# {title}",
        "",
        f"This model is a merge of pre-trained models made with splice {__version__}.",
        "",
        "## Merge details",
        "",
        "### Merge method",
        "",
        _method_sentence(record),
        "",
        "### Inputs",
        "",
        *_input_table(record),
        "",
        DIGEST_MEANING,
    ]
    if earlier:
        lines += ["", "### Stages", "", "Inputs made by earlier stages of the same multi-stage recipe, as they ran:"]
        for stage in earlier:
            lines += ["", f"#### {stage.name}", "", _method_sentence(stage), "", *_input_table(stage)]
            lines += ["", "```yaml", _yaml(stage.recipe.model_dump(mode="json", exclude_defaults=True)).rstrip(), "```"]
    seed = f" --seed {record.seed}" if record.seed is not None else ""
    lines += [
        "",
        "### Recipe",
        "",
        f"The recipe as run, in `{RECIPE_AS_RUN}` (`splice merge {RECIPE_AS_RUN} --out DIR{seed}` runs it again):",
        "",
        "```yaml",
        _yaml(recipe.model_dump(mode="json", exclude_defaults=True)).rstrip(),
        "```",
        "",
    ]
    if no_mergekit_config:
        lines.append(f"No `{MERGEKIT_CONFIG}` is written: {no_mergekit_config}.")
    else:
        lines.append(f"`{MERGEKIT_CONFIG}` holds the same recipe as a mergekit config, for mergekit's tools.")
        if recipe.dtype is not None:
            lines.append(
                f"mergekit computes in `dtype` ({recipe.dtype}) where splice accumulates in float32, so their "
                "outputs may differ by rounding."
            )
    return "\n".join(lines) + "\n"


def _method_sentence(record: MergeRecord) -> str:
    recipe = record.recipe
    try:
        spec = mergekit_method(recipe.merge_method).spec
        name, url = spec.pretty_name or spec.name, spec.reference_url
    except RecipeError:  # a method that is splice's own
        name, url = recipe.merge_method, None
    method = f"[{name}]({url})" if url else name
    _, base_index = recipe.inputs()
    base = f" with {_model_md(recipe.base_model)} as the base" if base_index is not None and recipe.base_model else ""
    return f"Merged with the {method} method (`merge_method: {recipe.merge_method}`){base}."


def _input_table(record: MergeRecord) -> list[str]:
    _, base_index = record.recipe.inputs()
    rows = ["| model | role | digest |", "|---|---|---|"]
    stored = {
        **dict.fromkeys(record.recipe.read_stats(), "statistics"),
        **dict.fromkeys(record.recipe.read_masks(), "mask"),
    }
    for index, (model, digest) in enumerate(record.digests.items()):
        role = stored.get(model) or ("base" if index == base_index else "merged")
        rows.append(f"| {_model_md(model)} | {role} | `{digest}` |")
    return rows


def _model_md(reference: str) -> str:
    hub = _hub_id(reference)
    return f"[{reference}](https://huggingface.co/{hub})" if hub else f"`{reference}`"


def _hub_id(reference: str) -> str | None:
    """The Hub repository a reference names (`org/name`, `org/name@revision`), None for a path or URL."""
    model = reference.partition("+")[0]
    if "://" in model or os.path.exists(model) or not _HUB_ID.match(model):
        return None
    return model.partition("@")[0]


def _hub_ids(records: Sequence[MergeRecord]) -> list[str]:
    found: dict[str, None] = {}
    for record in records:
        for reference in record.digests:
            for part in reference.split("+", 1):
                hub = _hub_id(part)
                if hub:
                    found[hub] = None
    return list(found)


def _yaml(data: object) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
