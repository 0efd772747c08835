"""Porting in one pass (issue 22): each base is read once while the ported model streams into its staged output, the
drift report joins that output before it is published, and its PNG is drawn by a child process. The outputs are,
byte for byte, those of the two-pass route (the measuring pass, then `apply_patches` of the ported patch, as ports
were written before); a refusal found while streaming publishes nothing, through the real command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_port import KINDS, evolved, independent_update, lineage_setup

import splice
from splice.adapters.compose import patch_steps
from splice.adapters.extract import extract_patch_to
from splice.adapters.port import port_patch, prepare_port, write_ported
from splice.options import RunOptions
from splice.plots import FigureProcess, png_bytes, warm_up
from splice.registry.refs import RegistryError
from splice.registry.store import Registry
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.partials import PARTIAL

from conftest import perturbed, save, tiny_model
from helpers import load_dir

ENV = {**os.environ, "PYTHONPATH": str(Path(splice.__file__).parents[1]), "COLUMNS": "200"}


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file's bytes; a patch manifest's without the time it was written."""
    files = {path.name: path.read_bytes() for path in sorted(directory.iterdir())}
    if "patch.json" in files:
        manifest = json.loads(files["patch.json"])
        assert manifest.pop("created")
        files["patch.json"] = json.dumps(manifest).encode()
    return files


def bf16_lineage(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(old base, a fine-tune of it, the evolved base), stored in bf16."""
    base = tiny_model("llama", 0)
    models = (base, perturbed(base, 1, 0.05), evolved(base, 7))
    return tuple(save(m.to(torch.bfloat16), tmp_path / n, True) for m, n in zip(models, ("v1", "tuned", "v2")))


@pytest.mark.parametrize(
    "kind, dtype, with_old",
    [
        ("lora", "fp32", True),
        ("delta", "fp32", True),
        ("layernorm", "fp32", True),  # replaces tensors whole: ported values computed while streaming
        ("mask", "fp32", True),
        ("lora", "fp32", False),
        ("lora", "bf16", True),
        ("delta", "bf16", False),
    ],
)
def test_one_pass_writes_the_bytes_of_the_two_pass_route(kind, dtype, with_old, tmp_path):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama") if dtype == "fp32" else bf16_lineage(tmp_path)
    extract_patch_to(tmp_path / "patch", v1, tuned, kind, **KINDS[kind])
    old = {"old_base": v1} if with_old else {}
    one = port_patch(tmp_path / "patch", v2, out=tmp_path / "one", as_patch=tmp_path / "one-patch", scale=0.7, **old)
    two = prepare_port(tmp_path / "patch", v2, scale=0.7, **old)
    write_ported(two, v2, out=tmp_path / "two", as_patch=tmp_path / "two-patch")
    # shards, index, config, port_report.json and port_report.png (drawn by the child there, in this process here)
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")
    assert files_of(tmp_path / "one-patch") == files_of(tmp_path / "two-patch")
    assert one.drift.as_dict() == two.drift.as_dict() and one.stream is not None
    if with_old:  # and both are the new base plus the scaled update, computed from the patch's files alone
        out, new = load_dir(tmp_path / "one"), load_dir(v2)
        update = independent_update(tmp_path / "patch", {n: t.float() for n, t in load_dir(v1).items()})
        for name, value in new.items():
            expected = value.double() + 0.7 * update[name].double() if name in update else value.double()
            expected = expected.to(value.dtype).double() if dtype == "bf16" else expected
            atol = 1e-6 if dtype == "fp32" else float(value.abs().max()) * 2**-7
            torch.testing.assert_close(out[name].double(), expected, rtol=0, atol=atol, msg=name)


def test_a_cuda_port_streams_through_the_copies_and_writes_what_the_cpu_writes(tmp_path, monkeypatch):
    """With a cuda device the stream hands the kernel its inputs through the host-device copies (here the CPU double
    in CudaCopies' place): the port measures and patches them there and publishes the CPU's bytes."""
    from test_transfer import LIMITS, DeferredCopies

    import splice.tensors.stream as stream

    v1, tuned, v2 = lineage_setup(tmp_path, "llama")
    extract_patch_to(tmp_path / "patch", v1, tuned, "layernorm")
    port_patch(tmp_path / "patch", v2, out=tmp_path / "cpu", old_base=v1, scale=0.7, device="cpu")
    made: list[DeferredCopies] = []
    monkeypatch.setattr(stream, "CudaCopies", lambda device: made.append(DeferredCopies()) or made[-1])
    monkeypatch.setattr(stream.computed_with_copies, "__defaults__", (LIMITS,))
    run = RunOptions(device=torch.device("cuda"))
    ported = port_patch(tmp_path / "patch", v2, out=tmp_path / "gpu", old_base=v1, scale=0.7, run=run)
    assert ported.stream.device == "cuda" and len(made) == 1 and made[0].copied["up"] > 0
    assert files_of(tmp_path / "gpu") == files_of(tmp_path / "cpu")


def test_each_base_is_read_once(tmp_path, monkeypatch):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama")
    extract_patch_to(tmp_path / "patch", v1, tuned, "lora", rank=2)
    steps = patch_steps(splice.Patch.load(tmp_path / "patch"))
    reads: list[tuple[str, str]] = []
    whole = Checkpoint.read

    def counted(self, name, rows=None):
        if rows is None:
            reads.append((self.location, name))
        return whole(self, name, rows)

    monkeypatch.setattr(Checkpoint, "read", counted)
    port_patch(tmp_path / "patch", v2, out=tmp_path / "out", old_base=v1)
    for base in (v2, v1):  # each patched tensor read whole once from each base: hashed, measured and patched
        assert sorted(name for location, name in reads if location == str(base)) == sorted(steps)
    reads.clear()
    write_ported(prepare_port(tmp_path / "patch", v2, old_base=v1), v2, out=tmp_path / "two")
    assert sorted(name for location, name in reads if location == str(v2)) == sorted([*steps, *steps])


def _last_patched(patch: Path, base: Path) -> str:
    steps = patch_steps(splice.Patch.load(patch))
    return [name for name in Checkpoint.open(base).tensors if name in steps][-1]


def _changed(base: Path, name: str, change) -> None:
    """`base` (a sharded model directory) with tensor `name` changed by `change(tensor)` in place, in its shard."""
    shard = base / json.loads((base / "model.safetensors.index.json").read_text())["weight_map"][name]
    state = load_file(shard)
    change(state[name])
    save_file(state, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("fault", ["old base differs", "new base holds NaN"])
def test_a_port_refused_while_streaming_publishes_nothing_through_the_command_line(fault, tmp_path):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama")
    extract_patch_to(tmp_path / "patch", v1, tuned, "lora", rank=2)
    registry = tmp_path / "registry"
    Registry.init(registry).push("chat", tmp_path / "patch")
    # the last patched tensor in the new base's storage order: every other tensor is already in the staged output
    name = _last_patched(tmp_path / "patch", v2)
    if fault == "old base differs":
        _changed(v1, name, lambda t: t[0].add_(1e-3))
        message = f"{v1} (--from) is not the base this patch was made on: {name} differs"
    else:
        _changed(v2, name, lambda t: t[0].fill_(float("nan")))
        message = f"{v2} holds NaN/Inf in {name}, a tensor the patch changes"
    outputs = [tmp_path / name for name in ("out", "ported", "report")]
    command = [*("port", "chat@1", "--registry", str(registry), "--to", str(v2), "--from", str(v1)), "-q"]
    command += ["--out", str(outputs[0]), "--as-patch", str(outputs[1]), "--report", str(outputs[2])]
    command += ["--push", "chat-v2"]
    result = subprocess.run(
        [sys.executable, "-m", "splice", *command], capture_output=True, text=True, timeout=300, env=ENV
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert not any(path.exists() for path in outputs)
    assert not [path for path in tmp_path.rglob("*") if PARTIAL in path.name]
    store = Registry.open(registry)
    assert store.names() == ["chat"] and store.health("chat") == ([], [])
    with pytest.raises(RegistryError):
        store.versions("chat-v2")


def test_the_png_is_drawn_outside_the_process_and_equals_one_drawn_inside(tmp_path):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama")
    extract_patch_to(tmp_path / "patch", v1, tuned, "delta")
    script = (
        "import sys\nfrom splice.adapters.port import port_patch\n"
        f"port_patch({str(tmp_path / 'patch')!r}, {str(v2)!r}, out={str(tmp_path / 'out')!r}, old_base={str(v1)!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # the port's process never imported matplotlib
    drawn_here = prepare_port(tmp_path / "patch", v2, old_base=v1).drift.files()
    assert (tmp_path / "out" / "port_report.png").read_bytes() == drawn_here["port_report.png"]
    assert (tmp_path / "out" / "port_report.json").read_bytes() == drawn_here["port_report.json"]


def started(monkeypatch) -> FigureProcess:
    """A figure process with its child started, as in a process that has not imported matplotlib (this one has)."""
    with monkeypatch.context() as hidden:
        hidden.delitem(sys.modules, "matplotlib.figure")
        figures = FigureProcess()
    assert figures.child is not None
    return figures


def test_a_figure_process_draws_what_png_bytes_draws_and_falls_back_to_drawing_here(monkeypatch):
    expected = png_bytes(warm_up, (3.0, 2.0))
    with started(monkeypatch) as figures:
        child = figures.child
        assert figures.png(warm_up, (3.0, 2.0)) == expected
        assert child.returncode == 0 and figures.child is None  # drawn there: one figure per child, then it ends

    def local(figure) -> None:  # does not pickle: drawn here
        warm_up(figure)

    with started(monkeypatch) as figures:
        assert figures.png(local, (3.0, 2.0)) == expected

    def broken(figure) -> None:
        raise ValueError("a figure that fails")

    with started(monkeypatch) as figures, pytest.raises(ValueError, match="a figure that fails"):
        figures.png(broken, (3.0, 2.0))  # the error a drawing in this process gives
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    with started(monkeypatch) as figures:  # a child that dies at once
        assert figures.png(warm_up, (3.0, 2.0)) == expected
    with FigureProcess() as figures:  # matplotlib is loaded here: drawn here, no child
        assert figures.child is None and figures.png(warm_up, (3.0, 2.0)) == expected


def test_leaving_a_figure_process_ends_its_child(monkeypatch):
    with started(monkeypatch) as figures:
        child = figures.child
        assert child is not None and child.poll() is None
    assert child.returncode is not None and figures.child is None
