"""Models with different vocabularies: `tokenizer_source: union | base | MODEL`, the `tokenizer:` section and
`chat_template`, against `mergekit-yaml` on tiny Llamas that carry real `tokenizers` tokenizers (word-level, over
synthetic words; some shared at different ids, some unique, two added special tokens).

mergekit's union tokenizer numbers the tokens it adds in the order of Python sets and Rust hash maps, different
from run to run, so the union is compared token by token; every other source is compared id by id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers
import yaml

import splice
from splice.errors import IncompatibleModelsError, RecipeError, SpliceError
from splice.merge.tokenizer import TokenizerRequest, TokenizerSection, bundled_chat_templates, prepare_inputs
from splice.tensors.checkpoint import Checkpoint

from conftest import TINY_DECODER, perturbed
from helpers import load_dir

VOCABULARY = ("model.embed_tokens.weight", "lm_head.weight")
SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(40)]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"


def word_tokenizer(words: list[str], special: list[str] = ()) -> transformers.PreTrainedTokenizerFast:
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    return tokenizer


def bpe_tokenizer(words: list[str], added: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A BPE tokenizer (no merges) with `added` tokens after its words: mergekit strips only BPE tokenizers."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE({w: i for i, w in enumerate(words)}, [], unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_tokens(added)
    return tokenizer


def llama(rows: int, seed: int, tied: bool = False) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_DECODER, "vocab_size": rows}, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config)


def save(directory: Path, model: torch.nn.Module, tokenizer, template: str | None = None) -> str:
    model.save_pretrained(directory)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A (the base): 48 words. B: 30 of A's words in reverse order (other ids), 10 of its own, s0 and s1 (which C
    has too, A not: their rows in A are the average of B's and C's) and two added special tokens, 47 rows. C: 48
    rows like A, its last five words not A's (the same-size case). A2: A fine-tuned (A's tokenizer). P: A's
    tokenizer over 64 rows (padded, as Qwen2.5 pads). U: A's words in 48 rows, its tokenizer four tokens more (past
    its rows). At and Bt: A and B with tied embeddings."""
    root = tmp_path_factory.mktemp("vocabularies")
    a_words = SPECIALS + WORDS + [f"a{i}" for i in range(5)]
    b_words = SPECIALS + WORDS[::-1][:30] + [f"b{i}" for i in range(10)] + ["s0", "s1"]
    c_words = SPECIALS + WORDS + [f"c{i}" for i in range(3)] + ["s0", "s1"]
    a = llama(48, 0)
    b = llama(47, 1)
    made = {
        "A": save(root / "A", a, word_tokenizer(a_words)),
        "B": save(root / "B", b, word_tokenizer(b_words, ["<|im_start|>", "<|im_end|>"]), TEMPLATE),
        "C": save(root / "C", llama(48, 2), word_tokenizer(c_words), TEMPLATE),
        "A2": save(root / "A2", perturbed(a, 5), word_tokenizer(a_words)),
        "P": save(root / "P", llama(64, 3), word_tokenizer(a_words)),
        "U": save(root / "U", llama(48, 4), bpe_tokenizer(a_words, [f"<UNUSED_{i}>" for i in range(4)])),
    }
    for name, source, words, special in (("At", a, a_words, []), ("Bt", b, b_words, ["<|im_start|>", "<|im_end|>"])):
        tied = llama(source.config.vocab_size, 0, tied=True)
        tied.load_state_dict({k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}, strict=False)
        tied.tie_weights()
        made[name] = save(root / name, tied, word_tokenizer(words, special))
    return made


def recipe(method: str, base: str | None, weights: dict[str, float], **extra) -> dict:
    data: dict = {"merge_method": method, "dtype": "float32"}
    if base is not None:
        data["base_model"] = base
    data["models"] = [{"model": m, "parameters": {"weight": w}} for m, w in weights.items()]
    if method == "ties":
        for entry in data["models"]:
            entry["parameters"]["density"] = 0.5
    return {**data, **extra}


def union_recipe(models: dict[str, str]) -> dict:
    weights = {models["A"]: 0.4, models["B"]: 0.35, models["C"]: 0.25}
    return recipe("linear", models["A"], weights, tokenizer_source="union", chat_template="chatml")


def base_recipe(models: dict[str, str]) -> dict:
    weights = {models["C"]: 0.7, models["A2"]: 0.5}
    return recipe("task_arithmetic", models["A"], weights, tokenizer_source="base")


def model_recipe(models: dict[str, str]) -> dict:
    weights = {models["B"]: 0.7, models["C"]: 0.5}
    return recipe("ties", models["A"], weights, tokenizer_source=models["B"], chat_template="auto")


def section_recipe(models: dict[str, str]) -> dict:
    weights = {models["A"]: 0.5, models["B"]: 0.3, models["C"]: 0.2}
    section = {
        "source": models["A"],
        "pad_to_multiple_of": 32,
        "tokens": {
            "b3": {"source": models["B"]},
            "<|im_start|>": {"source": models["B"]},
            "w5": {"source": models["C"], "force": True},
            "zz_new": {"source": {"kind": "zero"}},
            "a1": {"source": {"kind": "model_token", "model": models["B"], "token": "b0"}, "force": True},
            "w12": {"source": {"kind": "model_token", "model": models["C"], "token_id": 3}},
        },
    }
    return recipe("linear", models["A"], weights, tokenizer=section)


def strip_recipe(models: dict[str, str]) -> dict:
    return recipe("linear", models["U"], {models["U"]: 0.6, models["B"]: 0.4}, tokenizer_source="base")


COMPARED = {
    "union": union_recipe,
    "base": base_recipe,
    "model": model_recipe,
    "section": section_recipe,
    "strip": strip_recipe,
}


# mergekit-yaml's own steps (read the YAML, validate it, `run_merge` with its default options), for several recipes
# in one process: one import of torch, transformers and mergekit instead of one per recipe
MERGEKIT = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
options = MergeOptions(lazy_unpickle=True, quiet=True)
options.apply_global_options()
for recipe, out in zip(sys.argv[1::2], sys.argv[2::2]):
    text = open(recipe, encoding="utf-8").read()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out, options=options, config_source=text)
"""


@pytest.fixture(scope="module")
def merged(models, tmp_path_factory):
    """merged(name) -> (splice's output, mergekit's) for a recipe of COMPARED; merged(name, recipe) -> splice's
    output (and None) for another. mergekit runs the COMPARED recipes in the background, started first."""
    root = tmp_path_factory.mktemp("merged")
    recipes = {name: make(models) for name, make in COMPARED.items()}
    arguments = []
    for name, data in recipes.items():
        (root / f"{name}.yml").write_text(yaml.safe_dump(data))
        arguments += [str(root / f"{name}.yml"), str(root / f"{name}-mergekit")]
    log = (root / "mergekit.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    mergekit = subprocess.Popen([sys.executable, "-c", MERGEKIT, *arguments], env=env, stdout=log, stderr=log)
    done: dict[str, tuple[Path, Path | None]] = {}

    def run(name: str, data: dict | None = None, **run_keywords) -> tuple[Path, Path | None]:
        if name not in done:
            path = root / f"{name}.yml"
            if data is not None:
                path.write_text(yaml.safe_dump(data))
            splice.merge(path, root / f"{name}-splice", device="cpu", **run_keywords)
            theirs = None
            if name in recipes:
                assert mergekit.wait(timeout=300) == 0, (root / "mergekit.log").read_text()[-2000:]
                theirs = root / f"{name}-mergekit"
            done[name] = (root / f"{name}-splice", theirs)
        return done[name]

    yield run
    if mergekit.poll() is None:
        mergekit.kill()
    mergekit.wait(timeout=60)
    log.close()


def vocabulary_of(directory: Path) -> dict[str, int]:
    data = json.loads((directory / "tokenizer.json").read_text())
    vocabulary = dict(data["model"]["vocab"])
    vocabulary.update({entry["content"]: entry["id"] for entry in data["added_tokens"]})
    return vocabulary


def added_tokens(directory: Path) -> list[dict]:
    return json.loads((directory / "tokenizer.json").read_text())["added_tokens"]


def vocab_size(directory: Path) -> int:
    return json.loads((directory / "config.json").read_text())["vocab_size"]


def assert_same_rows_by_token(ours: Path, theirs: Path) -> None:
    """Every tensor equal; vocabulary tensors row by row for each token, wherever each output put it."""
    mine, other = load_dir(ours), load_dir(theirs)
    our_tokens, their_tokens = vocabulary_of(ours), vocabulary_of(theirs)
    assert set(mine) == set(other)
    assert our_tokens.keys() == their_tokens.keys()
    for name in other:
        if name not in VOCABULARY:
            torch.testing.assert_close(mine[name], other[name], rtol=0, atol=1e-6, msg=name)
            continue
        assert mine[name].shape == other[name].shape, name
        for token, row in their_tokens.items():
            torch.testing.assert_close(mine[name][our_tokens[token]], other[name][row], rtol=0, atol=1e-6)


def assert_same_output(ours: Path, theirs: Path) -> None:
    """The same tokenizer (vocabulary and added tokens, id by id), config vocab_size and tensors."""
    assert vocabulary_of(ours) == vocabulary_of(theirs)
    assert added_tokens(ours) == added_tokens(theirs)
    assert vocab_size(ours) == vocab_size(theirs)
    mine, other = load_dir(ours), load_dir(theirs)
    assert set(mine) == set(other)
    for name in other:
        torch.testing.assert_close(mine[name], other[name], rtol=0, atol=1e-6, msg=name)


def test_union_equals_mergekit_token_by_token(models, merged):
    # blocks of 4 rows: the aligned rows are read and merged a block at a time
    ours, theirs = merged("union", chunk_bytes=256)
    assert_same_rows_by_token(ours, theirs)
    assert vocab_size(ours) == vocab_size(theirs) == 65
    by_content = {entry["content"]: {k: v for k, v in entry.items() if k != "id"} for entry in added_tokens(theirs)}
    assert {entry["content"]: {k: v for k, v in entry.items() if k != "id"} for entry in added_tokens(ours)} == (
        by_content
    )
    base = vocabulary_of(Path(models["A"]))
    assert {t: i for t, i in vocabulary_of(ours).items() if t in base} == base
    # splice's order is the recipe's: B's new words by their ids in B, then C's, then the added tokens
    new = sorted((i, t) for t, i in vocabulary_of(ours).items() if t not in base)
    assert [t for _, t in new] == [f"b{i}" for i in range(10)] + ["s0", "s1"] + [f"c{i}" for i in range(3)] + [
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert (ours / "chat_template.jinja").read_text() == (theirs / "chat_template.jinja").read_text()
    assert (ours / "chat_template.jinja").read_text() == bundled_chat_templates()["chatml"]


def test_union_output_reloads_tokenizes_and_runs(models, merged):
    ours, _ = merged("union", chunk_bytes=256)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ours)
    model = transformers.AutoModelForCausalLM.from_pretrained(ours)
    text = "w3 b5 c2 <|im_start|> w39"
    encoded = tokenizer(text, return_tensors="pt")
    expected = [vocabulary_of(ours)[word] for word in text.split()]
    assert encoded["input_ids"][0].tolist() == expected
    with torch.no_grad():
        logits = model(**encoded).logits
    assert logits.shape == (1, 5, 65) and bool(torch.isfinite(logits).all())
    embedding = load_dir(ours)["model.embed_tokens.weight"]
    torch.testing.assert_close(model.get_input_embeddings().weight, embedding, rtol=0, atol=0)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False)
    assert rendered == "<|im_start|>user\nw1<|im_end|>\n"


def test_base_tokenizer_of_a_same_size_vocabulary_equals_mergekit(models, merged):
    """The silent bug: A and C have 48 rows each but five different tokens; merged row by row (by id), rows
    43-47 of the embeddings and head mixed A's a0..a4 with C's c0, c1, c2, s0, s1."""
    ours, theirs = merged("base")
    assert_same_output(ours, theirs)
    assert vocabulary_of(ours) == vocabulary_of(Path(models["A"]))
    a, c, a2, out = (load_dir(Path(d)) for d in (models["A"], models["C"], models["A2"], ours))
    for name in VOCABULARY:
        by_id = a[name] + 0.7 * (c[name] - a[name]) + 0.5 * (a2[name] - a[name])
        # C lacks a0..a4: it takes the base's rows there (no change from C), where by id it added the other words'
        aligned = a[name] + 0.5 * (a2[name] - a[name])
        torch.testing.assert_close(out[name][43:], aligned[43:], rtol=0, atol=1e-6)
        torch.testing.assert_close(out[name][:43], by_id[:43], rtol=0, atol=1e-6)
        assert (out[name][43:] - by_id[43:]).abs().max() > 1e-3


def test_model_tokenizer_and_auto_chat_template_equal_mergekit(models, merged):
    ours, theirs = merged("model")
    assert_same_output(ours, theirs)
    assert vocabulary_of(ours) == vocabulary_of(Path(models["B"]))
    # B and C share a template, A has none: the template most inputs have
    assert (ours / "chat_template.jinja").read_text() == (theirs / "chat_template.jinja").read_text() == TEMPLATE


def test_tokenizer_section_with_overrides_and_padding_equals_mergekit(models, merged):
    ours, theirs = merged("section")
    assert_same_output(ours, theirs)
    assert vocab_size(ours) == 64  # 51 tokens (48 + b3, <|im_start|>, zz_new) padded to a multiple of 32
    vocabulary = vocabulary_of(ours)
    out, b, c = (load_dir(Path(d)) for d in (ours, models["B"], models["C"]))
    b_ids, c_ids = vocabulary_of(Path(models["B"])), vocabulary_of(Path(models["C"]))
    for name in VOCABULARY:
        # forced: every input takes that row, so the weighted mean (weights sum to 1) is the row itself
        torch.testing.assert_close(out[name][vocabulary["w5"]], c[name][c_ids["w5"]], rtol=0, atol=1e-6)
        torch.testing.assert_close(out[name][vocabulary["a1"]], b[name][b_ids["b0"]], rtol=0, atol=1e-6)
        assert not out[name][vocabulary["zz_new"]].any()
        padding = out[name][51:]
        assert padding.shape[0] == 13 and bool((padding == padding[0]).all())


def test_tokens_past_the_base_models_rows_are_dropped_as_mergekit_drops_them(models, merged):
    ours, theirs = merged("strip")
    assert_same_output(ours, theirs)
    assert len(vocabulary_of(ours)) == 48 and not any(t.startswith("<UNUSED") for t in vocabulary_of(ours))
    assert len(vocabulary_of(Path(models["U"]))) == 52


def test_row_blocks_read_as_the_whole_tensor(models):
    """Aligned rows read a block at a time (any block, padding rows included) equal the same rows read whole."""
    section = TokenizerSection.model_validate(section_recipe(models)["tokenizer"])
    locations = [models["A"], models["B"], models["C"]]
    checkpoints = [Checkpoint.open(location) for location in locations]
    prepared = prepare_inputs(
        TokenizerRequest.of(None, section, None), locations, checkpoints, models["A"], models["A"], Checkpoint.open
    )
    for checkpoint in prepared.checkpoints:
        for name in VOCABULARY:
            whole = checkpoint.read(name)
            assert whole.shape == (64, 16)
            for start, stop in [(0, 5), (5, 51), (40, 64), (50, 53), (63, 64)]:
                torch.testing.assert_close(checkpoint.read(name, (start, stop)), whole[start:stop], rtol=0, atol=0)


def test_padded_vocabulary_keeps_its_padding(models, merged):
    """P has 64 rows for A's 48 tokens. The output keeps the 64 rows (mergekit cuts them to the 48 tokens): P's
    padding rows merged with the other input's padding, the mean of its aligned token rows."""
    data = recipe("linear", models["P"], {models["P"]: 0.6, models["B"]: 0.4}, tokenizer_source="base")
    ours, _ = merged("padded", data)
    assert vocab_size(ours) == 64
    assert vocabulary_of(ours) == vocabulary_of(Path(models["P"]))
    p, b, out = (load_dir(Path(d)) for d in (models["P"], models["B"], ours))
    p_ids, b_ids = vocabulary_of(Path(models["P"])), vocabulary_of(Path(models["B"]))
    order = sorted(p_ids, key=p_ids.get)
    for name in VOCABULARY:
        # B's rows in P's order: its own where it has the token, else the base's (P's)
        b_aligned = torch.stack([b[name][b_ids[t]] if t in b_ids else p[name][p_ids[t]] for t in order])
        torch.testing.assert_close(out[name][:48], 0.6 * p[name][:48] + 0.4 * b_aligned, rtol=0, atol=1e-6)
        expected_padding = 0.6 * p[name][48:] + 0.4 * b_aligned.mean(dim=0)
        torch.testing.assert_close(out[name][48:], expected_padding, rtol=0, atol=1e-6)
    model = transformers.AutoModelForCausalLM.from_pretrained(ours)
    assert model.get_input_embeddings().weight.shape == (64, 16)


def test_tied_embeddings_stay_tied(models, merged):
    """Tied models store one vocabulary tensor: aligned like the untied models' embedding, the head follows it."""
    untied, _ = merged(
        "untied",
        recipe("linear", models["A"], {models["A"]: 0.5, models["B"]: 0.5}, tokenizer_source="union"),
    )
    tied, _ = merged(
        "tied",
        recipe("linear", models["At"], {models["At"]: 0.5, models["Bt"]: 0.5}, tokenizer_source="union"),
    )
    ours = load_dir(tied)
    assert "lm_head.weight" not in ours
    assert vocabulary_of(tied) == vocabulary_of(untied)
    torch.testing.assert_close(
        ours["model.embed_tokens.weight"], load_dir(untied)["model.embed_tokens.weight"], rtol=0, atol=0
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(tied)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tied)
    with torch.no_grad():
        logits = model(**tokenizer("w1 b2 <|im_end|>", return_tensors="pt")).logits
    assert logits.shape == (1, 3, vocab_size(tied))


def test_literal_chat_template_without_a_tokenizer_setting(models, merged):
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    data = recipe("linear", None, {models["A"]: 0.5, models["A2"]: 0.5}, chat_template=literal)
    ours, _ = merged("literal", data)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ours)
    assert tokenizer.chat_template == literal
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False) == "[user] w1\n"
    assert tokenizer.get_vocab() == transformers.AutoTokenizer.from_pretrained(models["A"]).get_vocab()
    assert vocab_size(ours) == 48 and load_dir(ours)["lm_head.weight"].shape == (48, 16)


# -- refusals -----------------------------------------------------------------------------------


def refused(tmp_path: Path, data: dict, error: type[Exception]) -> str:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(error) as caught:
        splice.merge(path, tmp_path / "out", device="cpu")
    message = str(caught.value)
    assert "\n" not in message and not (tmp_path / "out").exists()
    return message


@pytest.mark.parametrize(("other", "needle"), [("C", "'a0' is id 43"), ("B", "vocab_size is 48")])
def test_different_vocabularies_without_a_tokenizer_setting_are_refused(other, needle, models, tmp_path):
    """mergekit refuses different sizes too, and merges row by row, silently, the same size with other tokens."""
    data = recipe("linear", None, {models["A"]: 0.5, models[other]: 0.5})
    message = refused(tmp_path, data, IncompatibleModelsError)
    assert message.startswith("the models' vocabularies differ") and needle in message
    assert "tokenizer_source: base" in message and models[other] in message


def test_a_token_from_a_model_not_in_the_recipe_is_refused(models, tmp_path):
    section = {"source": "union", "tokens": {"w1": {"source": models["P"]}}}
    data = recipe("linear", models["A"], {models["A"]: 0.5, models["B"]: 0.5}, tokenizer=section)
    message = refused(tmp_path, data, RecipeError)
    assert "tokenizer.tokens['w1']" in message and f"model {models['P']} is not one of the recipe's models" in message


def test_an_unknown_chat_template_name_is_refused(models, tmp_path):
    data = recipe("linear", None, {models["A"]: 0.5, models["A2"]: 0.5}, chat_template="chatmll")
    message = refused(tmp_path, data, RecipeError)
    assert "chat_template: 'chatmll'" in message and "alpaca, chatml, exaone, llama3, mistral" in message


def test_tokenizer_source_and_tokenizer_together_are_refused(models, tmp_path):
    data = recipe(
        "linear", None, {models["A"]: 0.5, models["B"]: 0.5}, tokenizer_source="union", tokenizer={"source": "base"}
    )
    assert "tokenizer_source and tokenizer: both given" in refused(tmp_path, data, RecipeError)


def test_a_token_without_a_source_that_an_input_lacks_is_refused(models, tmp_path):
    section = {"source": "union", "tokens": {"b1": {"force": False}}}
    data = recipe("linear", models["A"], {models["A"]: 0.5, models["B"]: 0.5}, tokenizer=section)
    message = refused(tmp_path, data, RecipeError)
    assert "tokenizer.tokens['b1'] gives no source" in message and models["A"] in message


def test_an_input_without_a_tokenizer_is_refused(models, tmp_path):
    bare = tmp_path / "bare"
    transformers.AutoModelForCausalLM.from_pretrained(models["A2"]).save_pretrained(bare)
    data = recipe("linear", None, {models["A"]: 0.5, str(bare): 0.5}, tokenizer_source="union")
    assert f"{bare} has no tokenizer" in refused(tmp_path, data, SpliceError)


def sliced(models: dict[str, str], first: str, second: str, **extra) -> dict:
    sources = [
        {"model": models[first], "layer_range": [0, 2], "parameters": {"weight": 0.5}},
        {"model": models[second], "layer_range": [0, 2], "parameters": {"weight": 0.5}},
    ]
    return {"merge_method": "linear", "dtype": "float32", "slices": [{"sources": sources}], **extra}


def test_slices_over_different_vocabularies_are_refused(models, tmp_path):
    """mergekit fills an embedding's missing rows from the first slice's sources and base, a head's from the last
    slice's; splice aligns over the whole recipe, so it refuses rather than differ."""
    data = sliced(models, "A", "B", base_model=models["A"], tokenizer_source="union")
    message = refused(tmp_path, data, RecipeError)
    assert message.startswith("slices: over models whose vocabularies differ is not supported yet")


def test_slices_over_one_vocabulary_take_a_tokenizer_setting(models, tmp_path):
    """Where every input already has the output's vocabulary in its rows nothing is filled: slices merge."""
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(sliced(models, "A", "A2", base_model=models["A"], tokenizer_source="base")))
    splice.merge(path, tmp_path / "out", device="cpu")
    ours, a, a2 = load_dir(tmp_path / "out"), load_dir(Path(models["A"])), load_dir(Path(models["A2"]))
    for name in VOCABULARY:
        torch.testing.assert_close(ours[name], 0.5 * a[name] + 0.5 * a2[name], rtol=0, atol=1e-6)
    assert vocabulary_of(tmp_path / "out") == vocabulary_of(Path(models["A"]))


def test_compute_mergekit_over_different_vocabularies_is_refused(models, tmp_path):
    data = recipe("linear", models["A"], {models["A"]: 0.5, models["B"]: 0.5}, tokenizer_source="union")
    message = refused(tmp_path, {**data, "compute": "mergekit"}, RecipeError)
    assert message.startswith("compute: mergekit over models whose vocabularies differ is not supported yet")


def test_an_output_may_not_replace_the_tokenizer_source(models, tmp_path):
    """A model named only as the tokenizer's source is read: `force` may not replace it either."""
    donor = tmp_path / "donor"
    shutil.copytree(models["A"], donor)
    data = recipe("linear", None, {models["A"]: 0.5, models["A2"]: 0.5}, tokenizer_source=str(donor))
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(data))
    before = sorted(p.name for p in donor.iterdir())
    with pytest.raises(SpliceError) as caught:
        splice.merge(path, donor, device="cpu", force=True)
    assert str(donor) in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(p.name for p in donor.iterdir()) == before


def test_a_stage_whose_tokenizer_source_changed_runs_again(models, tmp_path):
    """A stage's key covers the model its tokenizer comes from, not only the models it merges."""
    donor = tmp_path / "donor"
    shutil.copytree(models["A"], donor)
    first = {"name": "s1", **recipe("linear", None, {models["A"]: 0.5, models["A2"]: 0.5})}
    final = recipe("linear", None, {"s1": 0.5, models["A2"]: 0.5}, tokenizer_source=str(donor))
    path = tmp_path / "stages.yml"
    path.write_text(yaml.safe_dump_all([first, final]))
    splice.merge(path, tmp_path / "out", device="cpu")
    assert vocabulary_of(tmp_path / "out") == vocabulary_of(Path(models["A"]))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the donor's tokenizer becomes C's
        shutil.copy(Path(models["C"]) / name, donor / name)
    report = splice.merge(path, tmp_path / "out", device="cpu", force=True)
    assert [(stage.name, stage.status) for stage in report.stages] == [("s1", "reused"), (None, "ran")]
    assert vocabulary_of(tmp_path / "out") == vocabulary_of(Path(models["C"]))
