"""A recipe's output tokenizer (`tokenizer_source`, `tokenizer:`, `chat_template`), built as mergekit 0.1.5 builds it
with transformers' own tokenizers, and the inputs' vocabulary tensors aligned to it (splice.merge.vocabulary).

- `base`: the base model's tokenizer (the first model's without a base), less any token past its embedding rows.
- `union`: the base tokenizer with every other input's tokens added (plain tokens first, then added tokens with
  their settings, the first input that has a token deciding them), inputs in the recipe's order. mergekit adds them
  in the order of Python sets and Rust hash maps, so its ids for new tokens change from run to run; splice's do not.
- a model reference: that model's tokenizer.
- `tokenizer.tokens`: tokens added when missing, and where their rows come from (`source`: a model, `{kind: zero}`,
  `{kind: model_token, model, token | token_id}`; `force`: for every input, also those that have the token).
- `pad_to_multiple_of`: the row count rounded up (extra rows: the mean of each input's token rows).
- the output keeps the row count of the model its tokenizer comes from when that is larger (a padded vocabulary,
  Qwen2.5's 152064 rows for 151665 tokens); mergekit cuts it to the tokenizer's length.
- `chat_template`: `auto` (the template most inputs have), one of mergekit's bundled names, or a Jinja template.

Without a tokenizer setting the inputs must share one vocabulary (mergekit merges rows of different tokens
silently when the sizes agree); splice refuses what differs and says to set `tokenizer_source`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from splice.arch.vocabulary import vocabulary_size, vocabulary_tensors
from splice.errors import CheckpointError, IncompatibleModelsError, RecipeError, SpliceError, first_line
from splice.merge.references import ModelReference, ModelReferenceField
from splice.merge.vocabulary import Fallback, Vocabulary, aligned_checkpoints, plan_rows
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import OutputExtras
from splice.tensors.writer import TOKENIZER_FILES, read_side_files

log = logging.getLogger(__name__)

ALIGN_HINT = "add tokenizer_source: base (the base model's tokenizer), union, or a model to the recipe to align them"


class ModelToken(BaseModel):
    """A row taken from another token of one input (its id there, or the token it holds)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: ModelReference
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token or token_id")
        return self


class ZeroRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: ModelToken | ZeroRow | ModelReference | None = None
    force: bool = False


class TokenizerSection(BaseModel):
    """mergekit's `tokenizer:` section."""

    model_config = ConfigDict(extra="forbid")
    source: Annotated[str, ModelReferenceField(frozenset({"base", "union"}))] = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: Annotated[int, Field(gt=0)] | None = None


@dataclass(frozen=True)
class TokenizerRequest:
    """What a recipe asks of the output's tokenizer. `source` None: the inputs' shared vocabulary, unchanged."""

    source: str | None = None
    tokens: Mapping[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None

    @classmethod
    def of(
        cls, tokenizer_source: str | None, section: TokenizerSection | None, chat_template: str | None
    ) -> TokenizerRequest:
        if section is None:
            return cls(tokenizer_source, {}, None, chat_template)
        return cls(section.source, dict(section.tokens or {}), section.pad_to_multiple_of, chat_template)


@dataclass(frozen=True)
class PreparedInputs:
    """The inputs as the merge reads them (vocabulary tensors in the output's order) and what the output carries."""

    checkpoints: list[Checkpoint]
    extras: OutputExtras = OutputExtras()


# -- checked before any I/O -------------------------------------------------------------------


def tokenizer_models(tokenizer_source: str | None, section: TokenizerSection | None) -> list[str]:
    """The models a recipe's tokenizer settings name (its source, its tokens' sources), which it reads besides its
    inputs; `base` and `union` name none."""
    source = section.source if section is not None else tokenizer_source
    named = [source] if source not in (None, "base", "union") else []
    for setting in ((section.tokens if section else None) or {}).values():
        model = _token_model(setting)
        if model is not None:
            named.append(model)
    return [model for model in named if model is not None]


def _token_model(setting: TokenSetting) -> str | None:
    source = setting.source
    return source.model if isinstance(source, ModelToken) else source if isinstance(source, str) else None


def check_tokenizer_settings(
    tokenizer_source: str | None, section: TokenizerSection | None, chat_template: str | None, models: Sequence[str]
) -> None:
    """Refuse what a recipe's tokenizer settings get wrong, before anything is read (RecipeError)."""
    if tokenizer_source is not None and section is not None:
        raise RecipeError("tokenizer_source and tokenizer: both given; keep one (tokenizer: {source: ...} holds both)")
    for token, setting in ((section.tokens if section else None) or {}).items():
        model = _token_model(setting)
        if model is not None and model not in models:
            raise RecipeError(
                f"tokenizer.tokens[{token!r}]: model {model} is not one of the recipe's models "
                f"({', '.join(models)}); a token's row comes from one of them"
            )
    if chat_template is not None:
        chat_template_text(chat_template, [])


def bundled_chat_templates() -> dict[str, str]:
    """The chat templates mergekit ships, by name (chatml, llama3, ...)."""
    folder = resources.files("mergekit._data.chat_templates")
    return {
        entry.name.removesuffix(".jinja"): entry.read_text()
        for entry in folder.iterdir()
        if entry.name.endswith(".jinja")
    }


def chat_template_text(template: str, tokenizers: Sequence[Any]) -> str | None:
    """The template a recipe's `chat_template` names (mergekit's rule): `auto` the one most of `tokenizers` have
    (the first among equals; None if none has one), a bundled name its text, else a Jinja template as given."""
    if template == "auto":
        found = [_template_of(tokenizer) for tokenizer in tokenizers]
        counted = Counter(t for t in found if t)
        return counted.most_common(1)[0][0] if counted else None
    if len(template) < 256 and "\n" not in template and "{" not in template:
        bundled = bundled_chat_templates()
        if template in bundled:
            return bundled[template]
    if len(template) < 20 or "{" not in template:
        names = ", ".join(sorted(bundled_chat_templates()))
        raise RecipeError(
            f"chat_template: {template!r} is neither a template splice knows ({names}) nor a Jinja template; "
            f"name one of them, write auto (the inputs' own), or give the template's text"
        )
    return template


def _template_of(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


# -- reading tokenizers -----------------------------------------------------------------------


def tokenizer_files(checkpoint: Checkpoint) -> dict[str, bytes]:
    """A model's tokenizer files, as the output would copy them (no symbolic link, none oversized)."""
    return read_side_files(checkpoint, TOKENIZER_FILES)


def load_tokenizer(checkpoint: Checkpoint, scratch: Path, rows: int | None = None) -> Any:
    """A model's tokenizer loaded by transformers (None if it has no tokenizer files); `rows`: tokens at that id or
    past it (no embedding row) dropped."""
    files = tokenizer_files(checkpoint)
    if not files:
        return None
    directory = Path(tempfile.mkdtemp(dir=scratch))
    for name, content in files.items():
        (directory / name).write_bytes(content)
    if "config.json" in checkpoint.files():
        (directory / "config.json").write_bytes(checkpoint.read_file("config.json", follow_links=False))
    tokenizer = _auto_tokenizer(directory, checkpoint.location)
    if rows is None or max(tokenizer.get_vocab().values(), default=-1) < rows:
        return tokenizer
    _drop_tokens_from(directory, rows, checkpoint.location)
    tokenizer = _auto_tokenizer(directory, checkpoint.location)
    past = sorted(token for token, index in tokenizer.get_vocab().items() if index >= rows)
    if past:
        raise SpliceError(
            f"{checkpoint.location}: its tokenizer holds tokens past its {rows} embedding rows ({past[0]!r}, ...) "
            f"that splice cannot drop; remove them from its tokenizer files"
        )
    return tokenizer


def _auto_tokenizer(directory: Path, location: str) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises many types for a tokenizer it cannot read
        raise SpliceError(f"{location}: cannot load its tokenizer: {first_line(exc)}") from exc


def _drop_tokens_from(directory: Path, rows: int, location: str) -> None:
    """Rewrite a tokenizer's files without the tokens at id `rows` or past it (mergekit strips the base's so)."""
    path = directory / "tokenizer.json"
    if not path.exists():
        raise SpliceError(
            f"{location}: its tokenizer holds tokens past its {rows} embedding rows and has no tokenizer.json "
            f"to drop them from; remove them from its tokenizer files"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        dropped = {token for token, index in vocab.items() if index >= rows}
        model["vocab"] = {token: index for token, index in vocab.items() if index < rows}
        if "merges" in model:
            model["merges"] = [merge for merge in model["merges"] if not _merge_touches(merge, dropped)]
    elif isinstance(vocab, list):  # Unigram: ids are positions
        model["vocab"] = vocab[:rows]
    data["added_tokens"] = [entry for entry in data.get("added_tokens", []) if entry.get("id", rows) < rows]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if not (k.isdigit() and int(k) >= rows)}
            config_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def _merge_touches(merge: Any, dropped: set[str]) -> bool:
    parts = merge.split(" ") if isinstance(merge, str) else list(merge)
    return any(part in dropped for part in parts) or "".join(parts) in dropped


def _reloaded(tokenizer: Any, scratch: Path) -> Any:
    """A copy of a tokenizer, through its saved files."""
    import transformers

    directory = Path(tempfile.mkdtemp(dir=scratch))
    tokenizer.save_pretrained(str(directory))
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def saved_files(tokenizer: Any) -> dict[str, bytes]:
    """The files transformers writes for a tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir()) if path.is_file()}


# -- building the output tokenizer ------------------------------------------------------------


def union_tokenizer(base: Any, others: Sequence[tuple[Any, int]], scratch: Path) -> Any:
    """The base tokenizer with the tokens of `others` ((tokenizer, embedding rows), base first) it lacks added."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer, rows in others:
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < rows:
                plain.setdefault(token)
        for index, info in sorted(tokenizer.added_tokens_decoder.items()):
            if index >= rows:
                continue
            if info.content in added and added[info.content] != info:
                log.warning("token %r is added with different settings by two inputs; the first one's are kept", info)
            added.setdefault(info.content, info)
    out = _reloaded(base, scratch)
    base_vocab = base.get_vocab()
    new = [token for token in plain if token not in added and token not in base_vocab]
    if new:
        out.add_tokens(new)
    if added:
        out.add_tokens(list(added.values()))
    return out


def prepare_inputs(
    request: TokenizerRequest,
    locations: Sequence[str],
    checkpoints: Sequence[Checkpoint],
    base_model: str | None,
    side_location: str,
    open_model: Callable[[str], Checkpoint],
) -> PreparedInputs:
    """The inputs with their vocabularies aligned to the output tokenizer the request asks for, and that tokenizer's
    files and the output's `vocab_size` (nothing when the request sets no tokenizer and no chat template)."""
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        if request.source is None:
            refuse_different_vocabularies(locations, checkpoints, scratch)
            if request.chat_template is None:
                return PreparedInputs(list(checkpoints))
            return _template_only(request.chat_template, locations, checkpoints, side_location, scratch)
        return _aligned(request, locations, checkpoints, base_model, open_model, scratch)


def _template_only(
    template: str, locations: Sequence[str], checkpoints: Sequence[Checkpoint], side_location: str, scratch: Path
) -> PreparedInputs:
    side = checkpoints[list(locations).index(side_location)]
    tokenizer = load_tokenizer(side, scratch)
    if tokenizer is None:
        raise SpliceError(f"chat_template: {side_location} has no tokenizer to write the template into")
    others = [load_tokenizer(c, scratch) for c in checkpoints] if template == "auto" else []
    text = chat_template_text(template, others)
    if text is not None:
        tokenizer.chat_template = text
    return PreparedInputs(
        list(checkpoints), OutputExtras(files=saved_files(tokenizer), replaced_side_files=TOKENIZER_FILES)
    )


def _aligned(
    request: TokenizerRequest,
    locations: Sequence[str],
    checkpoints: Sequence[Checkpoint],
    base_model: str | None,
    open_model: Callable[[str], Checkpoint],
    scratch: Path,
) -> PreparedInputs:
    inputs = dict(zip(locations, checkpoints))
    rows = [_rows_of(location, checkpoint) for location, checkpoint in inputs.items()]
    tokenizers = [
        _needed_tokenizer(location, checkpoint, scratch, count)
        for (location, checkpoint), count in zip(inputs.items(), rows)
    ]
    # read before the output tokenizer is built: with `base` it is the base's own object, and gains tokens
    vocabularies = [
        Vocabulary({t: i for t, i in tokenizer.get_vocab().items() if i < count}, count)
        for tokenizer, count in zip(tokenizers, rows)
    ]
    base_location = base_model or locations[0]
    if base_location in inputs:
        base = (tokenizers[locations.index(base_location)], rows[locations.index(base_location)])
        referenced = tokenizers
    else:
        base_checkpoint = open_model(base_location)
        base_rows = _rows_of(base_location, base_checkpoint)
        base = (_needed_tokenizer(base_location, base_checkpoint, scratch, base_rows), base_rows)
        referenced = [*tokenizers, base[0]]
    others = [(t, count) for location, t, count in zip(locations, tokenizers, rows) if location != base_location]
    out, source_rows = _output_tokenizer(request.source, base, others, inputs, open_model, scratch)
    for token in request.tokens:
        if token not in out.get_vocab():
            out.add_tokens(token)
    if request.chat_template is not None:
        text = chat_template_text(request.chat_template, referenced)
        if text is not None:
            out.chat_template = text
    vocabulary = out.get_vocab()
    out_rows = max(max(vocabulary.values()) + 1, source_rows)
    if request.pad_to_multiple_of:
        out_rows = -(-out_rows // request.pad_to_multiple_of) * request.pad_to_multiple_of
    base_index = locations.index(base_model) if base_model in inputs else None
    plan = plan_rows(
        vocabulary, out_rows, vocabularies, base_index, _chosen_rows(request.tokens, locations, vocabularies)
    )
    names = [
        _vocabulary_tensors(location, checkpoint, count) for (location, checkpoint), count in zip(inputs.items(), rows)
    ]
    log.info("output vocabulary: %d tokens in %d rows", len(vocabulary), out_rows)
    return PreparedInputs(
        aligned_checkpoints(checkpoints, names, plan),
        OutputExtras(
            files=saved_files(out), config_updates={"vocab_size": out_rows}, replaced_side_files=TOKENIZER_FILES
        ),
    )


def _output_tokenizer(
    source: str | None,
    base: tuple[Any, int],
    others: Sequence[tuple[Any, int]],
    inputs: Mapping[str, Checkpoint],
    open_model: Callable[[str], Checkpoint],
    scratch: Path,
) -> tuple[Any, int]:
    """The output tokenizer `source` names, and the rows of the model it comes from (whose padding is kept)."""
    if source == "base":
        return base
    if source == "union":
        return union_tokenizer(base[0], [base, *others], scratch), base[1]
    assert source is not None
    donor = inputs[source] if source in inputs else open_model(source)
    tokenizer = load_tokenizer(donor, scratch)
    if tokenizer is None:
        raise CheckpointError(f"tokenizer_source: {source} has no tokenizer")
    return tokenizer, vocabulary_size(donor.config()) or 0


def _needed_tokenizer(location: str, checkpoint: Checkpoint, scratch: Path, rows: int) -> Any:
    tokenizer = load_tokenizer(checkpoint, scratch, rows)
    if tokenizer is None:
        raise CheckpointError(f"{location} has no tokenizer; tokenizer_source needs every input's tokenizer")
    return tokenizer


def _vocabulary_tensors(location: str, checkpoint: Checkpoint, rows: int) -> list[str]:
    found = vocabulary_tensors(checkpoint, rows)
    if not found:
        raise SpliceError(
            f"{location}: no embedding or LM head has its config's vocab_size ({rows}) rows; cannot align its "
            f"vocabulary"
        )
    return found


def _rows_of(location: str, checkpoint: Checkpoint) -> int:
    rows = vocabulary_size(checkpoint.config())
    if rows is None:
        raise SpliceError(f"{location}: its config.json gives no vocab_size; cannot align its vocabulary")
    return rows


def _chosen_rows(
    settings: Mapping[str, TokenSetting],
    locations: Sequence[str],
    vocabularies: Sequence[Vocabulary],
) -> dict[str, tuple[Fallback, bool]]:
    """Each token setting as the rows its token takes and whether it is forced (a setting without a source, where
    no input needs it, changes nothing)."""
    chosen: dict[str, tuple[Fallback, bool]] = {}
    for token, setting in settings.items():
        source = setting.source
        where = f"tokenizer.tokens[{token!r}]"
        if isinstance(source, ZeroRow):
            chosen[token] = ((), setting.force)
        elif isinstance(source, ModelToken):
            index = locations.index(source.model)
            vocabulary = vocabularies[index]
            row = source.token_id if source.token_id is not None else vocabulary.tokens.get(source.token or "")
            if row is None or not 0 <= row < vocabulary.rows:
                named = f"token {source.token!r}" if source.token is not None else f"token_id {source.token_id}"
                raise RecipeError(f"{where}: {source.model} has no {named} (it has {vocabulary.rows} rows)")
            chosen[token] = (((index, row),), setting.force)
        elif isinstance(source, str):
            index = locations.index(source)
            row = vocabularies[index].tokens.get(token)
            if row is None:
                raise RecipeError(f"{where}: {source} has no token {token!r}; name a model that has it")
            chosen[token] = (((index, row),), setting.force)
        else:
            lacking = [loc for loc, v in zip(locations, vocabularies) if token not in v.tokens]
            if setting.force or lacking:
                why = "force is set" if setting.force else f"{lacking[0]} lacks it"
                raise RecipeError(
                    f"{where} gives no source, and {why}: give source: a model, {{kind: zero}} or "
                    f"{{kind: model_token, model: ..., token: ...}}"
                )
    return chosen


# -- inputs without a tokenizer setting -------------------------------------------------------


def refuse_different_vocabularies(locations: Sequence[str], checkpoints: Sequence[Checkpoint], scratch: Path) -> None:
    """Inputs merged row by row must share one vocabulary: the same embedding rows, the same token in each row
    (compared when every input's tokenizer can be read and their files differ)."""
    sizes = [vocabulary_size(c.config()) for c in checkpoints]
    known = [(location, size) for location, size in zip(locations, sizes) if size is not None]
    if len({size for _, size in known}) > 1:
        (first, first_size), (other, other_size) = known[0], next(k for k in known if k[1] != known[0][1])
        raise IncompatibleModelsError(
            f"the models' vocabularies differ: vocab_size is {first_size} in {first} but {other_size} in {other}; "
            f"{ALIGN_HINT}"
        )
    files = [tokenizer_files(c) for c in checkpoints]
    if not all(files) or all(f == files[0] for f in files[1:]):
        return
    vocabularies = [_declared_vocabulary(f, size, c, scratch) for f, size, c in zip(files, sizes, checkpoints)]
    if any(vocabulary is None for vocabulary in vocabularies):
        return
    reference = vocabularies[0]
    for location, vocabulary in zip(locations[1:], vocabularies[1:]):
        assert vocabulary is not None and reference is not None
        if vocabulary == reference:
            continue
        token = next(t for t in sorted({*vocabulary, *reference}) if vocabulary.get(t) != reference.get(t))
        raise IncompatibleModelsError(
            f"the models' vocabularies differ: token {token!r} is id {reference.get(token, 'absent')} in "
            f"{locations[0]} but {vocabulary.get(token, 'absent')} in {location}; {ALIGN_HINT}"
        )


def _declared_vocabulary(
    files: Mapping[str, bytes], rows: int | None, checkpoint: Checkpoint, scratch: Path
) -> dict[str, int] | None:
    """token -> id of the tokens with an embedding row: from tokenizer.json (its model's vocabulary and its added
    tokens), else from the tokenizer transformers loads; None if neither can be read (nothing to compare)."""
    vocabulary: dict[str, int] = {}
    try:
        data = json.loads(files["tokenizer.json"])
        declared = data["model"]["vocab"]
        pieces = declared.items() if isinstance(declared, dict) else ((p[0], i) for i, p in enumerate(declared))
        vocabulary.update((str(token), int(index)) for token, index in pieces)
        vocabulary.update((str(entry["content"]), int(entry["id"])) for entry in data.get("added_tokens", []))
    except (KeyError, TypeError, ValueError, IndexError):
        try:
            tokenizer = load_tokenizer(checkpoint, scratch)
        except SpliceError as exc:
            log.warning("cannot compare the vocabulary of %s with the other inputs': %s", checkpoint.location, exc)
            return None
        vocabulary = dict(tokenizer.get_vocab()) if tokenizer is not None else {}
    return {token: index for token, index in vocabulary.items() if rows is None or index < rows}
