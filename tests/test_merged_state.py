"""A merge held in memory (what a sweep evaluates without writing a candidate): tensor for tensor the model
`splice.merge` writes, for every kind of method, output dtype and input layout."""

from __future__ import annotations

import pytest
import torch

import splice
from splice.merge.recipe import merged_state, parse_recipe
from splice.options import RunOptions
from splice.progress import Progress
from splice.tensors.stream import Kernel, open_all, plan_same_name, run_stream, stream_to_memory

from helpers import load_dir


def recipe_for(method: str, base: str, first: str, second: str, dtype: str | None) -> dict:
    models = [
        {"model": first, "parameters": {"weight": [0.3, 0.8], "density": 0.5}},
        {"model": second, "parameters": {"weight": 0.6, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}},
    ]
    if method == "linear":
        models = [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}} for m in models]
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": first,
            "models": [{"model": first}, {"model": second}],
            "parameters": {"t": [0.2, 0.7]},
            "dtype": dtype,
        }
    return {"merge_method": method, "base_model": base, "models": models, "dtype": dtype}


class Counted(Progress):
    def __init__(self) -> None:
        self.started: list[int] = []
        self.items = 0

    def start(self, description: str, total_items: int, total_bytes: int, unit: str = "tensors") -> None:
        self.started.append(total_items)

    def advance(self, items: int, nbytes: int) -> None:
        self.items += items

    def finish(self) -> None:
        pass


@pytest.mark.parametrize(
    ("arch", "method", "dtype", "sharded"),
    [
        ("llama", "linear", None, True),
        ("llama", "ties", "bfloat16", False),
        ("bert", "dare_ties", None, True),  # random: the same seed, the same drops
        ("gpt2", "slerp", "float16", False),
        ("bert", "task_arithmetic", None, False),
    ],
)
def test_merged_state_is_the_written_merge_tensor_for_tensor(make_models, tmp_path, arch, method, dtype, sharded):
    base, first, second = (str(d) for d in make_models(arch, 3, sharded=sharded))
    recipe = parse_recipe(recipe_for(method, base, first, second, dtype))
    splice.merge(recipe, tmp_path / "written", seed=3, device="cpu")
    progress = Counted()
    state = merged_state(recipe, seed=3, run=RunOptions(device="cpu", progress=progress))
    written = load_dir(tmp_path / "written")
    assert state.keys() == written.keys()
    for name, tensor in written.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert progress.started == [len(written)] and progress.items == len(written)
    inputs = {p.name for p in tmp_path.iterdir()} - {"written"}
    assert len(inputs) == 3  # nothing written for the state held in memory


def test_in_memory_whole_tensors_equal_the_streams_row_blocks(make_models, tmp_path):
    checkpoints = open_all([str(d) for d in make_models("llama", 3)])
    plan = plan_same_name(checkpoints, None)
    kernel = Kernel(lambda name, tensors: tensors[0] * 0.25 + tensors[1] * 0.5 + tensors[2] * 0.25, elementwise=True)
    tiny_blocks = RunOptions(device="cpu", chunk_bytes=256)  # every matrix written in many row blocks
    run_stream(plan, kernel, tmp_path / "blocks", side_files_from=checkpoints[0], run=tiny_blocks)
    state = stream_to_memory(plan, kernel, run=tiny_blocks)
    for name, tensor in load_dir(tmp_path / "blocks").items():
        assert torch.equal(state[name], tensor), name


def test_tensors_a_kernel_passes_through_are_read_as_stored(make_models):
    checkpoints = open_all([str(d) for d in make_models("bert", 2)])
    plan = plan_same_name(checkpoints, None)
    kept = plan[0].output.name
    state = stream_to_memory(
        plan, Kernel(lambda name, tensors: tensors[1], passes_through=frozenset({kept})), run=RunOptions(device="cpu")
    )
    assert torch.equal(state[kept], checkpoints[0].read(kept))
    other = plan[1].output.name
    assert torch.equal(state[other], checkpoints[1].read(other)) and not torch.equal(
        state[kept], checkpoints[1].read(kept)
    )
