"""Tiny models built from configs (never downloaded), saved as real HF model directories."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

ARCHITECTURES = ("bert", "vit", "gpt2", "llama")

pytest_plugins = ["strict_skips"]


# the tiny Llama-style decoder's settings (Llama, Mistral, Qwen2; tests vary them with `{**TINY_DECODER, ...}`)
TINY_DECODER = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)


def tiny_model(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "bert":
        config = transformers.BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=32,
            num_labels=3,
        )
        return transformers.BertForSequenceClassification(config)
    if arch == "vit":
        config = transformers.ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=1,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            num_labels=3,
        )
        return transformers.ViTForImageClassification(config)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(config)
    decoder = TINY_DECODER
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**decoder))
    if arch == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**decoder, sliding_window=3))
    if arch == "qwen2":  # layer 0 full attention, layer 1 a sliding window: its blocks are called with different masks
        config = transformers.Qwen2Config(**decoder, sliding_window=3, use_sliding_window=True, max_window_layers=1)
        return transformers.Qwen2ForCausalLM(config)
    if arch == "t5":  # not in ARCHITECTURES: an encoder-decoder whose norms are T5LayerNorm (RMS) modules
        config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2)
        return transformers.T5ForConditionalGeneration(config)
    raise ValueError(arch)


def model_class(arch: str):
    return type(tiny_model(arch, 0))


def example_inputs(arch: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    if arch == "vit":
        return {"pixel_values": torch.rand(2, 1, 8, 8, generator=generator)}
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=generator)}


def save(model: torch.nn.Module, directory: Path, sharded: bool) -> Path:
    # ~8 KB shards split every tiny model into several files.
    model.save_pretrained(directory, max_shard_size="8KB" if sharded else "5GB")
    return directory


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A 'fine-tuned' copy: the same init plus small seeded noise on every float parameter."""
    generator = torch.Generator().manual_seed(seed)
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for parameter in copy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return copy


@pytest.fixture
def make_models(tmp_path):
    """make_models(arch, count, sharded=False, family=True) -> list of model dirs.

    family=True: a base model (first dir) and count-1 perturbed fine-tunes of it (one basin, as soups need);
    family=False: independently initialised models.
    """

    def build(arch: str, count: int, sharded: bool = False, family: bool = True) -> list[Path]:
        base = tiny_model(arch, 0)
        dirs = []
        for i in range(count):
            model = base if i == 0 else (perturbed(base, i) if family else tiny_model(arch, i))
            dirs.append(save(model, tmp_path / f"{arch}-{i}{'-sharded' if sharded else ''}", sharded))
        return dirs

    return build


@pytest.fixture
def cleaned_tmp_path(tmp_path):
    """tmp_path for a test that writes real models (~100 MB each): removed when the test ends, where pytest
    would keep its last three runs' directories."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)
