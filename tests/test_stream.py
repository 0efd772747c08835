"""The executor: errors on the write-behind thread reach the caller and nothing is published."""

from __future__ import annotations

import pytest
import torch

from splice.errors import SpliceError
from splice.options import RunOptions
from splice.tensors.stream import Kernel, open_all, plan_same_name, run_stream


@pytest.mark.parametrize("bad_at", [0, 7])
def test_a_kernel_result_of_the_wrong_shape_fails_the_run(bad_at, make_models, tmp_path):
    checkpoints = open_all([str(d) for d in make_models("llama", 2)])
    plan = plan_same_name(checkpoints, None)
    bad_name = plan[bad_at].output.name
    seen = []

    def kernel(name, tensors):
        seen.append(name)
        return tensors[0][:1] if name == bad_name else tensors[0]

    with pytest.raises(SpliceError, match=f"tensor {bad_name}: computed"):
        run_stream(plan, Kernel(kernel), tmp_path / "out", side_files_from=checkpoints[0], run=RunOptions(device="cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-0", "llama-1"]  # no output, no partial dir
    assert len(seen) < len(plan) or bad_at == len(plan) - 1  # the run stopped soon after the failure


def test_kernel_output_is_written_in_order_with_write_behind(make_models, tmp_path):
    checkpoints = open_all([str(d) for d in make_models("llama", 2)])
    plan = plan_same_name(checkpoints, None)
    run_stream(
        plan,
        Kernel(lambda name, tensors: tensors[1] * 2),
        tmp_path / "out",
        side_files_from=checkpoints[0],
        run=RunOptions(device="cpu", read_ahead_depth=1),
    )
    out = open_all([str(tmp_path / "out")])[0]
    assert list(out.tensors) == [item.output.name for item in plan]
    for name in out.tensors:
        assert torch.equal(out.read(name), checkpoints[1].read(name) * 2)


def test_writer_takes_row_blocks_only_in_order(tmp_path):
    from splice.tensors.writer import OutputTensor, ShardedWriter

    writer = ShardedWriter(tmp_path, [OutputTensor("w", torch.float32, (4, 2))])
    writer.write("w", torch.zeros(2, 2), rows=(0, 2))
    with pytest.raises(SpliceError, match="rows 3..4 arrived after row 2"):
        writer.write("w", torch.zeros(1, 2), rows=(3, 4))
    with pytest.raises(SpliceError, match=r"computed \(1, 2\)"):
        writer.write("w", torch.zeros(1, 2), rows=(2, 4))
    writer.write("w", torch.ones(2, 2), rows=(2, 4))
    writer.close()
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], torch.tensor([[0.0, 0]] * 2 + [[1.0, 1]] * 2))
