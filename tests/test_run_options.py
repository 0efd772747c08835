"""One value for how a run runs: `run=RunOptions(...)` or its fields as keywords, folded by one helper; the stream
learns what a kernel allows from the kernel itself."""

from __future__ import annotations

import pytest
import torch

import splice
from splice.errors import SpliceError
from splice.options import RunOptions, run_options
from splice.tensors.stream import Kernel, open_all, plan_same_name, run_stream, work_units

from helpers import load_dir


def test_run_options_fold_keywords_and_refuse_a_conflict():
    assert run_options(None, {}, "soup") == RunOptions()
    assert run_options(None, {"device": "cpu", "force": True}, "soup") == RunOptions(device="cpu", force=True)
    given = RunOptions(device="cpu")
    assert run_options(given, {"device": "cpu"}, "soup") is given  # the same value twice is no conflict
    with pytest.raises(SpliceError, match="soup got `device='cuda'` and `run` with device='cpu'") as caught:
        run_options(given, {"device": "cuda"}, "soup")
    assert "\n" not in str(caught.value)
    with pytest.raises(TypeError, match="unexpected keyword argument 'devcie'"):
        run_options(None, {"devcie": "cpu"}, "soup")


def test_an_entry_point_takes_the_run_whole_or_as_keywords(make_models, tmp_path):
    dirs = make_models("llama", 2)
    splice.soup(dirs, tmp_path / "keywords", device="cpu", shard_size=5000)
    splice.soup(dirs, tmp_path / "whole", run=RunOptions(device="cpu", shard_size=5000))
    keywords, whole = load_dir(tmp_path / "keywords"), load_dir(tmp_path / "whole")
    assert list(keywords) == list(whole) and all(torch.equal(keywords[n], whole[n]) for n in keywords)
    assert sorted(p.name for p in (tmp_path / "keywords").glob("*.safetensors")) == sorted(
        p.name for p in (tmp_path / "whole").glob("*.safetensors")
    )
    with pytest.raises(SpliceError, match="`force=False` and `run` with force=True"):
        splice.soup(dirs, tmp_path / "keywords", run=RunOptions(device="cpu", force=True), force=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'read_ahead'"):
        splice.merge(tmp_path / "recipe.yaml", tmp_path / "merged", read_ahead=2)  # accepted and unused before


def test_fusion_options_run_fields_fold_into_the_run(tmp_path):
    from splice.merge.fusion import FusionOptions

    with pytest.raises(SpliceError, match="fuse got `device='cuda'` and `run` with device='cpu'"):
        splice.fuse(
            [tmp_path / "a", tmp_path / "b"],
            tmp_path / "out",
            FusionOptions(align="weights", device="cuda"),
            run=RunOptions(device="cpu"),
        )
    assert FusionOptions(align="weights", device="cpu").run_keywords() == {"device": "cpu"}
    assert not (tmp_path / "out").exists()


def test_the_stream_feeds_row_blocks_only_to_an_elementwise_kernel(make_models, tmp_path):
    checkpoints = open_all([str(d) for d in make_models("gpt2", 2)])
    plan = plan_same_name(checkpoints, None)
    seen: dict[bool, list[int]] = {True: [], False: []}
    for elementwise in (True, False):

        def first(name: str, tensors: list[torch.Tensor], elementwise: bool = elementwise) -> torch.Tensor:
            seen[elementwise].append(tensors[0].shape[0] if tensors[0].dim() else 0)
            return tensors[0]

        run_stream(
            plan,
            Kernel(first, elementwise=elementwise),
            tmp_path / str(elementwise),
            side_files_from=checkpoints[0],
            run=RunOptions(device="cpu", chunk_bytes=256),
        )
    assert len(seen[True]) > len(seen[False]) == len(plan)  # blocks of rows only where the kernel allows them
    assert len(work_units(plan, chunked=True, chunk_bytes=256)) == len(seen[True])


def test_tensors_a_kernel_passes_through_are_copied_as_stored(make_models, tmp_path):
    checkpoints = open_all([str(d) for d in make_models("llama", 2)])
    plan = plan_same_name(checkpoints, None)
    kept = frozenset(item.output.name for item in plan[::2])
    computed: list[str] = []

    def doubled(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        computed.append(name)
        return tensors[1] * 2

    run_stream(
        plan,
        Kernel(doubled, passes_through=kept),
        tmp_path / "out",
        side_files_from=checkpoints[0],
        run=RunOptions(device="cpu"),
    )
    out = load_dir(tmp_path / "out")
    assert set(computed) == {item.output.name for item in plan} - kept
    for name in out:
        want = checkpoints[0].read(name) if name in kept else checkpoints[1].read(name) * 2
        assert torch.equal(out[name], want), name
