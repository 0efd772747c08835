"""`slices:` recipes (frankenmerges, per-slice merges, depth up-scaling) equal mergekit-yaml's output tensor by tensor
on Llama, GPT-2 and BERT, match a computation by hand where layers are copied, and reload in transformers with the
new depth."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from mergekit.scripts.run_yaml import main as mergekit_yaml

import splice
from splice.merge.recipe import merged_state, parse_recipe
from splice.workflows.sweep.space import check_space

from conftest import example_inputs, model_class, perturbed, save, tiny_model
from helpers import load_dir, run_cli

DEPTH = 4
DEPTH_KEY = {"llama": "num_hidden_layers", "gpt2": "n_layer", "bert": "num_hidden_layers"}
LAYER_PREFIX = {"llama": "model.layers.", "gpt2": "transformer.h.", "bert": "bert.encoder.layer."}
EMBEDDINGS = {
    "llama": ("model.embed_tokens.",),
    "gpt2": ("transformer.wte.", "transformer.wpe."),
    "bert": ("bert.embeddings.",),
}
ATTENTION = {"llama": "self_attn", "gpt2": ".attn.", "bert": ".attention."}
ATTENTION_OUT = {"llama": "self_attn.o_proj", "gpt2": "attn.c_proj", "bert": "attention.output.dense"}
MLP = {"llama": "mlp", "gpt2": "mlp", "bert": "intermediate"}


def deep(arch: str, seed: int) -> torch.nn.Module:
    """conftest's tiny model of `arch` with DEPTH layers."""
    config = tiny_model(arch, seed).config
    setattr(config, DEPTH_KEY[arch], DEPTH)
    torch.manual_seed(seed)
    return model_class(arch)(config)


@dataclass(frozen=True)
class Family:
    """A base model (also stored sharded, as a second copy) and two fine-tunes of it (one stored sharded)."""

    arch: str
    base: str
    base_sharded: str
    first: str
    second: str


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    built: dict[str, Family] = {}

    def family(arch: str) -> Family:
        if arch not in built:
            root = tmp_path_factory.mktemp(f"{arch}-family")
            base = deep(arch, 0)
            built[arch] = Family(
                arch,
                str(save(base, root / "base", False)),
                str(save(base, root / "base-sharded", True)),
                str(save(perturbed(base, 1, 0.05), root / "first-sharded", True)),
                str(save(perturbed(base, 2, 0.05), root / "second", False)),
            )
        return built[arch]

    return family


def frankenmerge(f: Family) -> dict:
    """Passthrough: layers repeated (base 1, 2) and interleaved with a fine-tune's, 8 layers from parents of 4; a
    scale on one slice's attention outputs, one on a source layer, and a source's scale overriding its slice's."""
    return {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": f.base, "layer_range": [0, 2]}]},
            {  # a source's filter matches its own tensor names (layer 1 there, output layer 2), as in mergekit
                "sources": [
                    {
                        "model": f.first,
                        "layer_range": [1, 3],
                        "parameters": {"scale": [{"filter": f"{LAYER_PREFIX[f.arch]}1.", "value": 2.0}]},
                    }
                ]
            },
            {
                "sources": [{"model": f.base, "layer_range": [1, 4]}],
                "parameters": {"scale": [{"filter": ATTENTION_OUT[f.arch], "value": 0.5}]},
            },
            {
                "sources": [{"model": f.first, "layer_range": [3, 4], "parameters": {"scale": 1.5}}],
                "parameters": {"scale": 0.1},
            },
        ],
    }


def per_slice_slerp(f: Family) -> dict:
    """slerp per slice: a global gradient t for the first slice; the second slice's own t, a gradient on attention
    tensors and a constant elsewhere."""
    attention = ATTENTION[f.arch]
    return {
        "merge_method": "slerp",
        "base_model": f.base,
        "dtype": "float32",
        "parameters": {"t": [0, 0.5, 1]},
        "slices": [
            {"sources": [{"model": f.base, "layer_range": [0, 2]}, {"model": f.first, "layer_range": [0, 2]}]},
            {
                "sources": [{"model": f.base, "layer_range": [2, 4]}, {"model": f.first, "layer_range": [2, 4]}],
                "parameters": {"t": [{"filter": attention, "value": [1, 0.2]}, {"value": 0.3}]},
            },
        ],
    }


def upscale(f: Family) -> dict:
    """SOLAR's depth up-scaling: layers [0, n-1) of one copy of a model stacked on layers [1, n) of another."""
    return {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": f.base_sharded, "layer_range": [0, DEPTH - 1]}]},
            {"sources": [{"model": f.base, "layer_range": [1, DEPTH]}]},
        ],
    }


def ties_by_slice(f: Family) -> dict:
    """ties with parameters at every level: a source's weight over the global one, a slice's density over the
    global one, a filtered density falling back to the global value, and a source's weight gradient in a slice of one
    layer (where mergekit's t is 1)."""

    def sources(start: int, end: int, first: dict | None = None, second: dict | None = None) -> list[dict]:
        models = ((f.base, None), (f.first, first), (f.second, second))
        return [{"model": m, "layer_range": [start, end], **({"parameters": p} if p else {})} for m, p in models]

    return {
        "merge_method": "ties",
        "base_model": f.base,
        "dtype": "float32",
        "parameters": {"weight": 0.4, "density": 0.5},
        "slices": [
            {"sources": sources(0, 2, first={"weight": 0.9}), "parameters": {"density": 0.7}},
            {"sources": sources(2, 3), "parameters": {"density": [{"filter": MLP[f.arch], "value": 0.3}]}},
            {"sources": sources(3, 4, second={"weight": [0.2, 0.6]})},
        ],
    }


RECIPES = {"frankenmerge": frankenmerge, "slerp": per_slice_slerp, "upscale": upscale, "ties": ties_by_slice}
NEW_DEPTH = {"frankenmerge": 8, "slerp": DEPTH, "upscale": 2 * DEPTH - 2, "ties": DEPTH}


@dataclass(frozen=True)
class Merged:
    family: Family
    recipe: dict
    splice_out: Path
    mergekit_out: Path


@pytest.fixture(scope="module")
def merged(families, tmp_path_factory):
    done: dict[tuple[str, str], Merged] = {}

    def run(arch: str, name: str) -> Merged:
        if (arch, name) not in done:
            family = families(arch)
            root = tmp_path_factory.mktemp(f"{arch}-{name}")
            recipe = RECIPES[name](family)
            path = root / "recipe.yml"
            path.write_text(yaml.safe_dump(recipe))
            splice.merge(path, root / "splice", device="cpu")
            with pytest.MonkeyPatch.context() as env:
                env.setenv("HF_HUB_OFFLINE", "1")
                # mergekit-yaml's own command, run in this process (its import is most of a subprocess's 5 s)
                flags = ["--lazy-unpickle", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
                mergekit_yaml([str(path), str(root / "mergekit"), *flags], standalone_mode=False)
            done[arch, name] = Merged(family, recipe, root / "splice", root / "mergekit")
        return done[arch, name]

    return run


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)


def reloads_with_depth(arch: str, out: Path, depth: int) -> None:
    model, info = model_class(arch).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert getattr(model.config, DEPTH_KEY[arch]) == depth
    assert len(model.base_model.get_submodule({"llama": "layers", "gpt2": "h", "bert": "encoder.layer"}[arch])) == depth
    with torch.no_grad():
        logits = model.eval()(**example_inputs(arch)).logits
    assert torch.isfinite(logits).all()


def copied_by_hand(f: Family, recipe: dict) -> dict[str, torch.Tensor]:
    """A passthrough recipe computed without splice: each output layer's tensors are its source layer's, renamed
    and scaled by the first scale that applies (source, then slice); embeddings from the first slice's model, every
    other tensor outside the layers from the last slice's, scaled by that slice's."""
    prefix, states, expected = LAYER_PREFIX[f.arch], {}, {}

    def scale_of(entry: dict, piece: dict, name: str) -> float:
        for settings in (entry.get("parameters", {}), piece.get("parameters", {})):
            value = settings.get("scale")
            if isinstance(value, list):
                value = next((c["value"] for c in value if c["filter"] in name), None)
            if value is not None:
                return value
        return 1.0

    k = 0
    for piece in recipe["slices"]:
        (entry,) = piece["sources"]
        state = states.setdefault(entry["model"], load_dir(Path(entry["model"])))
        for index in range(*entry["layer_range"]):
            for name, tensor in state.items():
                if name.startswith(f"{prefix}{index}."):
                    out = f"{prefix}{k}.{name[len(prefix) + len(str(index)) + 1 :]}"
                    expected[out] = tensor * scale_of(entry, piece, name)
            k += 1
    for piece, embeddings in ((recipe["slices"][0], True), (recipe["slices"][-1], False)):
        (entry,) = piece["sources"]
        for name, tensor in states[entry["model"]].items():
            if not name.startswith(prefix) and name.startswith(EMBEDDINGS[f.arch]) == embeddings:
                expected[name] = tensor * scale_of(entry, piece, name)
    return expected


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_equals_mergekit_yaml_and_reloads_deeper(arch, name, merged):
    run = merged(arch, name)
    ours, theirs = load_dir(run.splice_out), load_dir(run.mergekit_out)
    assert_same_tensors(ours, theirs)
    reloads_with_depth(arch, run.splice_out, NEW_DEPTH[name])
    if run.recipe["merge_method"] == "passthrough":
        assert_same_tensors(ours, copied_by_hand(run.family, run.recipe))
    elif run.recipe["merge_method"] == "slerp":
        assert_slerp_by_hand(run.family, ours)
    else:
        base = load_dir(Path(run.family.base))
        assert all(not torch.equal(ours[n], base[n]) for n in base if n.endswith(f"{MLP[arch]}.up_proj.weight"))


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two tensors as flat vectors (linear when they are nearly parallel; a zero vector,
    GPT-2's initial biases, is orthogonal to every other)."""
    a, b = v0.flatten().double(), v1.flatten().double()
    cos = torch.dot(a / a.norm().clamp_min(1e-8), b / b.norm().clamp_min(1e-8)).clamp(-1, 1)
    if cos.abs() > 0.9995:
        return ((1 - t) * v0.double() + t * v1.double()).float()
    theta = torch.arccos(cos)
    mixed = torch.sin((1 - t) * theta) / torch.sin(theta) * a + torch.sin(t * theta) / torch.sin(theta) * b
    return mixed.reshape(v0.shape).float()


def assert_slerp_by_hand(f: Family, ours: dict[str, torch.Tensor]) -> None:
    """per_slice_slerp's t where it can be told: slice 0 runs the global gradient from t = 0 (the base) to t = 1
    (the fine-tune); slice 1's attention runs its own gradient from 1 to 0.2, its other tensors take 0.3."""
    base, first = load_dir(Path(f.base)), load_dir(Path(f.first))
    prefix = LAYER_PREFIX[f.arch]
    for name in base:
        if not name.startswith(prefix):
            continue
        index = int(name[len(prefix) :].split(".")[0])
        t = [0.0, 1.0, 1.0, 0.2][index] if ATTENTION[f.arch] in name else [0.0, 1.0, 0.3, 0.3][index]
        torch.testing.assert_close(ours[name], slerp(t, base[name], first[name]), rtol=0, atol=1e-5, msg=name)


def test_depth_in_config_and_output_order(merged):
    run = merged("llama", "frankenmerge")
    config = json.loads((run.splice_out / "config.json").read_text())
    assert config["num_hidden_layers"] == 8
    names = list(load_dir(run.splice_out))  # as stored: embeddings, then layer by layer, then the rest
    layers = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    assert names[0] == "model.embed_tokens.weight" and layers == sorted(layers) and len(set(layers)) == 8
    assert set(names[-2:]) == {"model.norm.weight", "lm_head.weight"}


@pytest.mark.parametrize("name", ["frankenmerge", "ties"])
def test_merged_state_equals_the_written_model(name, merged):
    run = merged("llama", name)
    state = merged_state(parse_recipe(run.recipe), run=splice.RunOptions(device="cpu"))
    written = load_dir(run.splice_out)
    assert list(state) == list(written)
    for tensor_name, tensor in written.items():
        assert torch.equal(state[tensor_name], tensor), tensor_name


def test_splice_merge_command_runs_a_slices_recipe(merged, tmp_path, monkeypatch, capsys):
    run = merged("gpt2", "upscale")
    recipe = tmp_path / "upscale.yml"
    recipe.write_text(yaml.safe_dump(run.recipe))
    code, _, err = run_cli(
        ["merge", recipe, "--out", tmp_path / "out", "--device", "cpu", "--quiet"], monkeypatch, capsys
    )
    assert code == 0, err
    assert_same_tensors(load_dir(tmp_path / "out"), load_dir(run.mergekit_out))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_layer"] == NEW_DEPTH["upscale"]


def test_per_layer_config_lists_are_restacked(tmp_path):
    """Qwen2's `layer_types` (sliding or full attention per layer) follows each layer to its new place: the output
    reloads (transformers refuses a list of the old length; mergekit-yaml writes one) and computes what a model
    built by hand from the same layers computes, on inputs longer than the sliding window."""
    config = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=DEPTH,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=2,
    )
    torch.manual_seed(0)
    source = transformers.Qwen2ForCausalLM(config).eval()
    assert source.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    save(source, tmp_path / "qwen", False)
    taken = [2, 3, 0, 1, 2]  # layers [2, 4) then [0, 3)
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(tmp_path / "qwen"), "layer_range": [2, 4]}]},
            {"sources": [{"model": str(tmp_path / "qwen"), "layer_range": [0, 3]}]},
        ],
    }
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    splice.merge(tmp_path / "recipe.yml", tmp_path / "out", device="cpu")
    merged_model = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    layer_types = [config.layer_types[i] for i in taken]
    assert merged_model.config.layer_types == layer_types and merged_model.config.num_hidden_layers == 5

    by_hand_config = transformers.Qwen2Config(
        **{**config.to_dict(), "num_hidden_layers": 5, "layer_types": layer_types}
    )
    by_hand = transformers.Qwen2ForCausalLM(by_hand_config).eval()
    by_hand.model.embed_tokens.load_state_dict(source.model.embed_tokens.state_dict())
    by_hand.model.norm.load_state_dict(source.model.norm.state_dict())
    by_hand.lm_head.load_state_dict(source.lm_head.state_dict())
    for k, index in enumerate(taken):
        by_hand.model.layers[k].load_state_dict(source.model.layers[index].state_dict())
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(merged_model(tokens).logits, by_hand(tokens).logits, rtol=0, atol=1e-6)
        wrong = transformers.Qwen2Config(**{**by_hand_config.to_dict(), "layer_types": None})
        assert wrong.layer_types != layer_types  # what re-deriving the list (not re-stacking it) would give


def test_a_sweep_finds_marks_inside_slices(families):
    recipe = ties_by_slice(families("llama"))
    recipe["slices"][0]["sources"][1]["parameters"] = {"weight": {"search": "choice", "values": [0.2, 0.4]}}
    recipe["slices"][1]["parameters"] = {"density": {"search": "uniform", "low": 0.1, "high": 0.9}}
    parameters, filled = check_space(recipe)
    assert [p.name for p in parameters] == ["slices[0].sources[1].parameters.weight", "slices[1].parameters.density"]
    assert filled.slices is not None and filled.slices[1].parameters == {"density": 0.1}
    assert filled.slices[0].sources[1].parameters == {"weight": 0.2}


def test_every_tensor_of_a_layer_travels(tmp_path):
    """A Llama with attention biases (which mergekit's Llama table does not list: mergekit-yaml drops them, and
    transformers then initialises them) stacked SOLAR-style into bfloat16: every stored tensor of every layer is in
    the output, cast, and it reloads with nothing missing."""
    config = tiny_model("llama", 0).config
    config.num_hidden_layers, config.attention_bias = DEPTH, True
    torch.manual_seed(0)
    save(transformers.LlamaForCausalLM(config), tmp_path / "biased", False)
    recipe = upscale(Family("llama", *[str(tmp_path / "biased")] * 4))
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump({**recipe, "dtype": "bfloat16"}))
    splice.merge(tmp_path / "recipe.yml", tmp_path / "out", device="cpu")
    ours, expected = (
        load_dir(tmp_path / "out"),
        copied_by_hand(Family("llama", *[str(tmp_path / "biased")] * 4), recipe),
    )
    assert sum(n.endswith("self_attn.q_proj.bias") for n in ours) == 2 * DEPTH - 2
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], tensor.to(torch.bfloat16)), name
    reloads_with_depth("llama", tmp_path / "out", 2 * DEPTH - 2)


def test_the_head_is_merged_from_every_source_of_the_last_slice(families, tmp_path):
    """The final norm and head come from the last slice's sources, all of them. mergekit's planner pairs them with
    as many inputs as the first slice has, so with one source there it copies the first model's head and drops the
    other (mergekit 0.1.5); splice merges the head as the slice's layers are merged."""
    f = families("llama")
    recipe = {
        "merge_method": "linear",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": f.base, "layer_range": [0, 2], "parameters": {"weight": 1.0}}]},
            {
                "sources": [
                    {"model": m, "layer_range": [2, 4], "parameters": {"weight": 0.5}} for m in (f.base, f.first)
                ],
            },
        ],
    }
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    splice.merge(tmp_path / "recipe.yml", tmp_path / "out", device="cpu")
    ours, base, first = load_dir(tmp_path / "out"), load_dir(Path(f.base)), load_dir(Path(f.first))
    for name in ("lm_head.weight", "model.norm.weight", "model.layers.3.mlp.up_proj.weight"):
        torch.testing.assert_close(ours[name], 0.5 * base[name] + 0.5 * first[name], rtol=0, atol=1e-6)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"):
        assert torch.equal(ours[name], base[name])


def test_passthrough_copies_unscaled_tensors_byte_for_byte(merged, tmp_path, monkeypatch):
    """Nothing is computed for a tensor passthrough copies as stored: the writer copies its bytes (a scaled one is
    computed)."""
    from splice.tensors.writer import ShardedWriter

    run = merged("llama", "frankenmerge")
    copied: list[str] = []
    original = ShardedWriter.copy_stored

    def counting(self, name, source, stored_name=None):
        copied.append(name)
        return original(self, name, source, stored_name)

    monkeypatch.setattr(ShardedWriter, "copy_stored", counting)
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(run.recipe))
    splice.merge(tmp_path / "recipe.yml", tmp_path / "out", device="cpu")
    written = load_dir(tmp_path / "out")
    scaled = [
        n for n in written if ".layers.7." in n or ".layers.2." in n or n in ("lm_head.weight", "model.norm.weight")
    ]
    scaled += [n for n in written if "self_attn.o_proj" in n and n.split(".")[2] in ("4", "5", "6")]
    assert sorted(copied) == sorted(set(written) - set(scaled))
    assert_same_tensors(written, load_dir(run.splice_out))
