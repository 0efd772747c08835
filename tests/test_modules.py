"""`modules:` recipes (mergekit's per-module sections) on a tiny multimodal model equal mergekit-yaml's output tensor by
tensor, with parameters per module and slices that deepen the vision tower, and reload in transformers and run on an
image; what mergekit would silently drop or ignore is refused in one line.

The model is Mistral3ForConditionalGeneration (a Pixtral vision tower, a projector and a Mistral text decoder: the
LLaVA layout), the smallest multimodal model mergekit's architecture catalogue describes in modules; its catalogue has
no LLaVA, and a LLaVA model is refused for that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from mergekit.scripts.run_yaml import main as mergekit_yaml

import splice
from splice.errors import SpliceError
from splice.merge.recipe import parse_recipe

from helpers import load_dir

VISION_DEPTH, TEXT_DEPTH = 2, 3
IMAGE_TOKEN = 5
MODULES = ("text_decoder", "multi_modal_projector", "vision_tower")


def mistral3(seed: int, projector_bias: bool = False) -> torch.nn.Module:
    """A tiny Mistral3 (image 32x32 in 8x8 patches, merged 2x2: four image tokens), the same initial weights for every
    seed, each seed's perturbation apart."""
    text = transformers.MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=TEXT_DEPTH,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    vision = transformers.PixtralVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=VISION_DEPTH,
        num_attention_heads=2,
        head_dim=8,
        image_size=32,
        patch_size=8,
    )
    config = transformers.Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        spatial_merge_size=2,
        vision_feature_layer=-1,
        multimodal_projector_bias=projector_bias,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.Mistral3ForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def llava(path: Path) -> Path:
    """A tiny LLaVA (CLIP vision tower, Llama text model): an architecture mergekit's catalogue does not describe."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8
    )
    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mistral3")
    built = {}
    for name, seed in (("base", 0), ("first", 1), ("second", 2)):
        mistral3(seed).save_pretrained(root / name)
        built[name] = str(root / name)
    return built


def slerp_recipe(m: dict[str, str]) -> dict:
    """slerp with t per module: a gradient across the text decoder's layers, a vision tower of three layers stacked
    from two slices (one with its own t), the projector's t; the global t where none is given."""
    both = [{"model": m["base"]}, {"model": m["first"]}]
    return {
        "merge_method": "slerp",
        "base_model": m["base"],
        "parameters": {"t": 0.5},
        "modules": {
            "text_decoder": {"models": both, "parameters": {"t": [0.0, 0.4, 1.0]}},
            "vision_tower": {
                "slices": [
                    {
                        "sources": [{**model, "layer_range": [0, 2]} for model in both],
                        "parameters": {"t": [{"filter": "attention", "value": 0.2}, {"value": 0.9}]},
                    },
                    {"sources": [{**model, "layer_range": [1, 2]} for model in both]},
                ]
            },
            "multi_modal_projector": {"models": both, "parameters": {"t": 0.7}},
        },
    }


def ties_recipe(m: dict[str, str]) -> dict:
    """ties with parameters at every level mergekit reads: a model's or a source's over its slice's, over its
    module's, over the global ones; a module's filter that matches no tensor falls through to the global value."""
    return {
        "merge_method": "ties",
        "base_model": m["base"],
        "parameters": {"weight": 0.4, "density": 0.8},
        "modules": {
            "text_decoder": {
                "models": [
                    {"model": m["first"], "parameters": {"weight": [1.0, 0.2]}},
                    {"model": m["second"], "parameters": {"density": [{"filter": "mlp", "value": 0.3}]}},
                ],
                "parameters": {"weight": 0.6, "density": [{"filter": "q_proj", "value": 0.5}]},
            },
            "vision_tower": {
                "slices": [
                    {
                        "sources": [
                            {"model": m["base"], "layer_range": [0, 2]},
                            {"model": m["first"], "layer_range": [0, 2], "parameters": {"weight": 0.9}},
                            {"model": m["second"], "layer_range": [0, 2]},
                        ],
                        "parameters": {"density": 0.6},
                    },
                    {
                        "sources": [
                            {"model": m["base"], "layer_range": [0, 1]},
                            {"model": m["first"], "layer_range": [1, 2]},
                            {"model": m["second"], "layer_range": [0, 1]},
                        ]
                    },
                ],
                "parameters": {"weight": 0.3},
            },
            "multi_modal_projector": {
                "models": [{"model": m["first"]}, {"model": m["second"], "parameters": {"weight": 0.1}}],
                "parameters": {"density": 0.7},
            },
        },
    }


def models_recipe(m: dict[str, str]) -> dict:
    """Plain `models:` on the multimodal model: mergekit reads it as every module taking the models, so a gradient
    runs over each module's own layers (the vision tower's two, the text decoder's three)."""
    return {
        "merge_method": "slerp",
        "base_model": m["base"],
        "parameters": {"t": [0.1, 0.9]},
        "models": [{"model": m["base"]}, {"model": m["first"]}],
    }


RECIPES = {"slerp": slerp_recipe, "ties": ties_recipe, "models": models_recipe}
VISION_DEPTHS = {"slerp": 3, "ties": 3, "models": VISION_DEPTH}


@pytest.fixture(scope="module")
def merged(models, tmp_path_factory):
    """Each recipe merged by splice and by mergekit-yaml (run in this process: its import is most of its time)."""
    done = {}
    for name, recipe_of in RECIPES.items():
        root = tmp_path_factory.mktemp(name)
        path = root / "recipe.yml"
        path.write_text(yaml.safe_dump(recipe_of(models), sort_keys=False))
        splice.merge(path, root / "splice", device="cpu")
        flags = ["--lazy-unpickle", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
        mergekit_yaml([str(path), str(root / "mergekit"), *flags], standalone_mode=False)
        done[name] = root
    return done


def forward(directory: Path) -> torch.Tensor:
    """The model in `directory` reloaded by transformers (every tensor used, none missing) and run on an image."""
    model, info = transformers.Mistral3ForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    generator = torch.Generator().manual_seed(3)
    ids = torch.tensor([[1, *[IMAGE_TOKEN] * 4, 7, 8, 9]])
    pixels = torch.rand(1, 3, 32, 32, generator=generator)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[32, 32]])).logits


@pytest.mark.parametrize("name", list(RECIPES))
def test_equals_mergekit_yaml_and_reloads_with_the_vision_towers_depth(name, merged):
    root = merged[name]
    ours, theirs = load_dir(root / "splice"), load_dir(root / "mergekit")
    assert sorted(ours) == sorted(theirs)
    for tensor, value in theirs.items():
        torch.testing.assert_close(ours[tensor], value, rtol=0, atol=1e-6, msg=tensor)
    vision_layers = {tensor.split(".")[3] for tensor in ours if tensor.startswith("vision_tower.transformer.layers.")}
    assert len(vision_layers) == VISION_DEPTHS[name]  # three vision layers where two slices stack them

    config = json.loads((root / "splice" / "config.json").read_text())
    their_config = json.loads((root / "mergekit" / "config.json").read_text())
    for section, depth in (("vision_config", VISION_DEPTHS[name]), ("text_config", TEXT_DEPTH)):
        assert config[section]["num_hidden_layers"] == their_config[section]["num_hidden_layers"] == depth
    logits = forward(root / "splice")
    assert logits.isfinite().all()
    torch.testing.assert_close(logits, forward(root / "mergekit"), rtol=0, atol=1e-5)


def test_a_modules_gradient_runs_over_its_own_layers(models, merged):
    """By hand where it is simplest: the text decoder's t gradient [0, 0.4, 1] (its module's, over the global 0.5)
    gives its first layer as the base's and its last as the other model's."""
    ours = load_dir(merged["slerp"] / "splice")
    base, first = load_dir(Path(models["base"])), load_dir(Path(models["first"]))
    q = "language_model.model.layers.{}.self_attn.q_proj.weight"
    torch.testing.assert_close(ours[q.format(0)], base[q.format(0)], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[q.format(TEXT_DEPTH - 1)], first[q.format(TEXT_DEPTH - 1)], rtol=0, atol=1e-6)
    assert not torch.allclose(ours[q.format(1)], base[q.format(1)]) and not torch.allclose(
        ours[q.format(1)], first[q.format(1)]
    )


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("odd")
    mistral3(1, projector_bias=True).save_pretrained(root / "biased")
    return {"biased": str(root / "biased"), "llava": str(llava(root / "llava"))}


def refusal(recipe: dict, tmp_path: Path) -> str:
    """The one-line error splice.merge gives for `recipe`, nothing written."""
    with pytest.raises(SpliceError) as caught:
        splice.merge(parse_recipe(recipe), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_an_unknown_module_is_refused_with_the_architectures_modules(models, tmp_path):
    recipe = slerp_recipe(models)
    recipe["modules"]["audio_tower"] = recipe["modules"]["multi_modal_projector"]
    message = refusal(recipe, tmp_path)
    assert message.startswith("modules.audio_tower: mergekit's Mistral3ForConditionalGeneration has no module")
    assert all(module in message for module in MODULES)


def test_a_module_left_out_is_refused_not_dropped(models, tmp_path):
    recipe = slerp_recipe(models)
    del recipe["modules"]["vision_tower"]
    message = refusal(recipe, tmp_path)
    assert message.startswith("modules: no section for vision_tower of Mistral3ForConditionalGeneration")


def test_tensors_no_module_claims_are_refused_by_name(models, odd_models, tmp_path):
    recipe = ties_recipe({**models, "second": odd_models["biased"]})
    message = refusal(recipe, tmp_path)
    assert message.startswith(f"{odd_models['biased']} stores 2 tensors that no module of mergekit's Mistral3")
    assert "multi_modal_projector.linear_1.bias" in message and "multi_modal_projector.linear_2.bias" in message


def test_an_architecture_outside_mergekits_catalogue_is_refused(odd_models, tmp_path):
    llava_model = odd_models["llava"]
    recipe = {
        "merge_method": "linear",
        "parameters": {"weight": 0.5},
        "modules": {"text_decoder": {"models": [{"model": llava_model}]}},
    }
    message = refusal(recipe, tmp_path)
    assert message.startswith(f"{llava_model}: mergekit's architecture catalogue has no LlavaForConditionalGeneration")
    assert "Mistral3ForConditionalGeneration" in message


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            {"models": [{"model": "a"}], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]},
            "recipe: modules.vision_tower gives both models: and slices:",
        ),
        ({"parameters": {"t": 0.5}}, "recipe: modules.vision_tower gives neither models: nor slices:"),
        (
            {"merge_method": "linear", "models": [{"model": "a"}]},
            "recipe: modules.vision_tower.merge_method: mergekit has no per-module merge method",
        ),
        (
            {"base_model": "a", "models": [{"model": "a"}]},
            "recipe: modules.vision_tower.base_model: mergekit has no per-module base model",
        ),
        (
            {"models": [{"model": "a"}, {"model": "b"}], "parameters": {"tt": 0.5}},
            "recipe: modules.vision_tower: parameters: unknown parameter 'tt' for slerp",
        ),
    ],
)
def test_module_sections_mergekit_would_misread_are_refused(section, expected):
    recipe = {
        "merge_method": "slerp",
        "base_model": "a",
        "parameters": {"t": 0.5},
        "modules": {"vision_tower": section},
    }
    with pytest.raises(SpliceError) as caught:
        parse_recipe(recipe)
    assert str(caught.value).startswith(expected), str(caught.value)
    assert "\n" not in str(caught.value)


def test_modules_mixed_with_models_is_refused():
    recipe = {"merge_method": "linear", "models": [{"model": "a"}], "modules": {"x": {"models": [{"model": "a"}]}}}
    with pytest.raises(SpliceError, match=r"^recipe: models: and modules: cannot be mixed"):
        parse_recipe(recipe)
