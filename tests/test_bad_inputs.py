"""Bad inputs give one clear line and write nothing.

From Python each bad input raises a SpliceError subclass whose message is one line and names the problem
(and the file or tensor at fault); from the CLI the same input exits 2 with one `error: ...` line on
stderr. Either way the output directory does not exist afterwards and no hidden
`.NAME.splice-partial-*` sibling is left behind. A merge killed or failing half way publishes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

import splice
from splice.errors import (
    CheckpointError,
    IncompatibleModelsError,
    OutputExistsError,
    RecipeError,
    SpliceError,
)
from splice.tensors.checkpoint import Checkpoint

from conftest import perturbed, save, tiny_model
from helpers import run_cli, wait_for_marker

OUT_NAME = "merged"


# -- helpers -------------------------------------------------------------------------------------


def output_path(tmp_path: Path) -> Path:
    return tmp_path / "outputs" / OUT_NAME


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    if out.parent.exists():
        leftovers = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
        assert leftovers == [], f"hidden leftovers next to {out}: {leftovers}"


def assert_one_line_error(code: int, err: str, needles: list[str]) -> str:
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert len(lines) == 1, f"expected one line on stderr, got: {err}"
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def assert_one_line_message(error: BaseException, needles: list[str]) -> None:
    message = str(error)
    assert message and "\n" not in message, repr(message)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_header(path: Path, header: dict, data: bytes) -> None:
    """Write a safetensors file with this header (its length field consistent) and data section."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def tensors_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


# -- models --------------------------------------------------------------------------------------


@dataclass
class Models:
    root: Path
    bert: list[Path]  # base + fine-tune, unsharded
    bert_sharded: list[Path]
    gpt2: Path
    bert_wide: Path  # same tensor names as bert, other shapes
    bert_extra: Path  # bert-1 plus one extra tensor
    bert_fp16: Path  # bert-1 stored in float16

    def copy(self, model: Path, destination: Path) -> Path:
        return Path(shutil.copytree(model, destination / model.name))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("bad-input-models")
    base = tiny_model("bert", 0)
    tuned = perturbed(base, 1)
    bert = [save(base, root / "bert-0", False), save(tuned, root / "bert-1", False)]
    bert_sharded = [save(base, root / "bert-0-sharded", True), save(tuned, root / "bert-1-sharded", True)]
    assert len(list(bert_sharded[1].glob("*.safetensors"))) >= 3
    gpt2 = save(tiny_model("gpt2", 0), root / "gpt2-0", False)
    wide_config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    bert_wide = save(transformers.BertForSequenceClassification(wide_config), root / "bert-wide", False)
    bert_extra = Path(shutil.copytree(bert[1], root / "bert-extra"))
    state = load_file(bert_extra / "model.safetensors")
    state["extra.weight"] = torch.ones(4)
    save_file(state, bert_extra / "model.safetensors", metadata={"format": "pt"})
    bert_fp16 = Path(shutil.copytree(bert[1], root / "bert-fp16"))
    state = {k: v.half() for k, v in load_file(bert_fp16 / "model.safetensors").items()}
    save_file(state, bert_fp16 / "model.safetensors", metadata={"format": "pt"})
    return Models(root, bert, bert_sharded, gpt2, bert_wide, bert_extra, bert_fp16)


# -- bad models: each case builds its inputs and says what the message must name -----------------


@dataclass
class Case:
    inputs: list[str]
    error: type[SpliceError]
    needles: list[str]


def case_missing_path(models: Models, tmp: Path) -> Case:
    missing = tmp / "no-such-model"
    return Case([str(models.bert[0]), str(missing)], CheckpointError, ["not found", str(missing)])


def case_no_weights(models: Models, tmp: Path) -> Case:
    empty = tmp / "config-only"
    empty.mkdir()
    shutil.copy(models.bert[0] / "config.json", empty / "config.json")
    return Case([str(models.bert[0]), str(empty)], CheckpointError, ["no weights", str(empty)])


def case_file_not_directory(models: Models, tmp: Path) -> Case:
    weights = models.bert[1] / "model.safetensors"
    return Case([str(models.bert[0]), str(weights)], CheckpointError, [str(weights), "directory"])


def case_truncated_shard(models: Models, tmp: Path) -> Case:
    model = models.copy(models.bert_sharded[1], tmp)
    shard = sorted(model.glob("*.safetensors"))[1]
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size - size // 3)
    return Case([str(models.bert_sharded[0]), str(model)], CheckpointError, [shard.name, "truncated"])


def case_offsets_past_end(models: Models, tmp: Path) -> Case:
    """The last tensor claims twice its bytes (shape and offsets consistent), running past the file."""
    model = models.copy(models.bert[1], tmp)
    path = model / "model.safetensors"
    header, data = read_header(path)
    last = tensors_by_offset(header)[-1]
    entry = header[last]
    start, end = entry["data_offsets"]
    entry["shape"] = [2 * entry["shape"][0], *entry["shape"][1:]]
    entry["data_offsets"] = [start, end + (end - start)]
    write_header(path, header, data)
    return Case([str(models.bert[0]), str(model)], CheckpointError, ["model.safetensors", last, "past the end"])


def case_offsets_disagree_with_shape(models: Models, tmp: Path) -> Case:
    model = models.copy(models.bert[1], tmp)
    path = model / "model.safetensors"
    header, data = read_header(path)
    name = tensors_by_offset(header)[-1]
    header[name]["data_offsets"][1] += 4
    write_header(path, header, data + b"\0" * 4)
    return Case([str(models.bert[0]), str(model)], CheckpointError, ["model.safetensors", name, "offsets"])


def case_unknown_dtype(models: Models, tmp: Path) -> Case:
    model = models.copy(models.bert[1], tmp)
    path = model / "model.safetensors"
    header, data = read_header(path)
    name = tensors_by_offset(header)[3]
    header[name]["dtype"] = "F99"
    write_header(path, header, data)
    return Case([str(models.bert[0]), str(model)], CheckpointError, ["model.safetensors", name, "F99"])


def case_overlapping_tensors(models: Models, tmp: Path) -> Case:
    """Two same-sized tensors pointed at the same bytes."""
    model = models.copy(models.bert[1], tmp)
    path = model / "model.safetensors"
    header, data = read_header(path)
    first, second = "bert.embeddings.LayerNorm.bias", "bert.embeddings.LayerNorm.weight"
    assert header[first]["shape"] == header[second]["shape"]
    header[second]["data_offsets"] = list(header[first]["data_offsets"])
    write_header(path, header, data)
    return Case([str(models.bert[0]), str(model)], CheckpointError, ["model.safetensors", "overlap", first, second])


def case_header_longer_than_file(models: Models, tmp: Path) -> Case:
    model = models.copy(models.bert[1], tmp)
    path = model / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) + 1000) + raw[8:])
    return Case([str(models.bert[0]), str(model)], CheckpointError, ["model.safetensors", "header runs past the end"])


def case_header_not_json(models: Models, tmp: Path) -> Case:
    model = models.copy(models.bert[1], tmp)
    path = model / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(raw))
    return Case([str(models.bert[0]), str(model)], CheckpointError, ["model.safetensors", "JSON"])


def case_shard_missing(models: Models, tmp: Path) -> Case:
    model = models.copy(models.bert_sharded[1], tmp)
    shard = max(model.glob("*.safetensors"))
    shard.unlink()
    return Case([str(models.bert_sharded[0]), str(model)], CheckpointError, [shard.name, "missing"])


def case_mismatched_shapes(models: Models, tmp: Path) -> Case:
    return Case(
        [str(models.bert[0]), str(models.bert_wide)],
        IncompatibleModelsError,
        ["shape", "bert.embeddings.LayerNorm.bias", "[16]", "[24]"],
    )


def case_mismatched_architectures(models: Models, tmp: Path) -> Case:
    return Case([str(models.bert[0]), str(models.gpt2)], IncompatibleModelsError, ["bert.embeddings", str(models.gpt2)])


def case_extra_tensor(models: Models, tmp: Path) -> Case:
    return Case(
        [str(models.bert[0]), str(models.bert_extra)], IncompatibleModelsError, ["extra.weight", str(models.bert_extra)]
    )


def case_mismatched_dtypes(models: Models, tmp: Path) -> Case:
    return Case([str(models.bert[0]), str(models.bert_fp16)], IncompatibleModelsError, ["float32", "float16"])


def case_integer_buffers_disagree(models: Models, tmp: Path) -> Case:
    """Integer buffers are copied, not averaged; differing ones are found mid-stream, after writing began."""
    copies = []
    for i, source in enumerate(models.bert):
        model = Path(shutil.copytree(source, tmp / f"with-buffer-{i}"))
        state = load_file(model / "model.safetensors")
        state["bert.embeddings.position_ids"] = torch.arange(32) if i == 0 else torch.arange(32).flip(0)
        save_file(state, model / "model.safetensors", metadata={"format": "pt"})
        copies.append(str(model))
    return Case(copies, IncompatibleModelsError, ["bert.embeddings.position_ids", "differs"])


MODEL_CASES: dict[str, Callable[[Models, Path], Case]] = {
    name.removeprefix("case_"): function for name, function in list(globals().items()) if name.startswith("case_")
}


@pytest.mark.parametrize("case_name", MODEL_CASES)
def test_bad_model_from_python(case_name, models, tmp_path):
    case = MODEL_CASES[case_name](models, tmp_path)
    out = output_path(tmp_path)
    with pytest.raises(case.error) as caught:
        splice.soup(case.inputs, out, device="cpu")
    assert_one_line_message(caught.value, case.needles)
    assert_nothing_written(out)


@pytest.mark.parametrize("case_name", MODEL_CASES)
def test_bad_model_from_cli(case_name, models, tmp_path, monkeypatch, capsys):
    case = MODEL_CASES[case_name](models, tmp_path)
    out = output_path(tmp_path)
    code, _, err = run_cli(["soup", *case.inputs, "--out", out, "--device", "cpu", "--quiet"], monkeypatch, capsys)
    assert_one_line_error(code, err, case.needles)
    assert_nothing_written(out)


@pytest.mark.parametrize("case_name", ["truncated_shard", "unknown_dtype", "mismatched_shapes"])
def test_bad_model_in_a_recipe(case_name, models, tmp_path, monkeypatch, capsys):
    """The same checks guard `splice merge`."""
    case = MODEL_CASES[case_name](models, tmp_path)
    entries = [{"model": m, "parameters": {"weight": 1.0}} for m in case.inputs]
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": entries})
    out = output_path(tmp_path)
    with pytest.raises(case.error) as caught:
        splice.merge(recipe, out, device="cpu")
    assert_one_line_message(caught.value, case.needles)
    code, _, err = run_cli(["merge", recipe, "--out", out, "--device", "cpu", "--quiet"], monkeypatch, capsys)
    assert_one_line_error(code, err, case.needles)
    assert_nothing_written(out)


@pytest.mark.parametrize("weird", ["run[final]", "run[/final]", "[bold]model"])
def test_error_message_prints_paths_verbatim(weird, tmp_path, monkeypatch, capsys):
    """Paths may hold square brackets; the CLI must print them as they are (they are not markup)."""
    missing = tmp_path / weird / "model"
    out = output_path(tmp_path)
    code, _, err = run_cli(["soup", missing, missing, "--out", out, "--device", "cpu", "--quiet"], monkeypatch, capsys)
    assert_one_line_error(code, err, ["not found", str(missing)])
    assert_nothing_written(out)


def test_cli_error_from_a_real_process(tmp_path):
    """The installed entry point (not just main() in this process): exit 2, one line, nothing written."""
    out = output_path(tmp_path)
    missing = tmp_path / "no-such-model"
    result = subprocess.run(
        [sys.executable, "-m", "splice", "soup", str(missing), str(missing), "--out", str(out), "--device", "cpu"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert_one_line_error(result.returncode, result.stderr, ["not found", str(missing)])
    assert result.stdout == ""
    assert_nothing_written(out)


# -- bad recipes ---------------------------------------------------------------------------------


def write_recipe(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def recipe_cases(models: Models) -> dict[str, tuple[dict, list[str]]]:
    base, tuned = str(models.bert[0]), str(models.bert[1])
    return {
        "unknown_method": (
            {"merge_method": "frobnicate", "models": [{"model": base}, {"model": tuned}]},
            ["frobnicate", "unknown merge method"],
        ),
        "misspelt_method": (  # the nearest method named first (issue 19: `tise` -> `ties`)
            {"merge_method": "tise", "models": [{"model": base}, {"model": tuned}]},
            ["unknown merge method 'tise' (did you mean 'ties'?)"],
        ),
        "unknown_parameter": (
            {
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": tuned, "parameters": {"weight": 1.0, "densty": 0.5}}],
            },
            ["densty", "unknown parameter", "density"],
        ),
        "missing_required_parameter": (
            {"merge_method": "ties", "base_model": base, "models": [{"model": tuned, "parameters": {"density": 0.5}}]},
            ["ties", "'weight'", tuned],
        ),
        "missing_base_model": (
            {"merge_method": "ties", "models": [{"model": tuned, "parameters": {"weight": 1.0, "density": 0.5}}]},
            ["ties", "base_model"],
        ),
        "unknown_key": (
            {"merge_method": "linear", "modles": [], "models": [{"model": base, "parameters": {"weight": 1.0}}]},
            ["modles"],
        ),
        "bad_parameter_type": (
            {
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": tuned, "parameters": {"weight": "heavy"}}],
            },
            ["weight", "heavy"],
        ),
        "unknown_dtype": (
            {"merge_method": "linear", "dtype": "float3", "models": [{"model": base, "parameters": {"weight": 1.0}}]},
            ["dtype", "float3"],
        ),
        "slices_with_models": (  # the mix named first, not the schema errors it would otherwise cause
            {
                "merge_method": "passthrough",
                "models": [{"model": base}],
                "slices": [{"sources": [{"model": base, "layer_range": [0, 2]}]}],
            },
            ["models: and slices: cannot be mixed"],
        ),
        "layer_range_past_the_depth": (  # mergekit's end is exclusive (its issues #354, #360)
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": tuned, "layer_range": [0, 3]}]}]},
            ["slices[0].sources[0]: layer_range [0, 3]", tuned, "2 layers", "exclusive", "[0, 2] takes them all"],
        ),
    }


RECIPE_CASES = [
    "unknown_method",
    "misspelt_method",
    "unknown_parameter",
    "missing_required_parameter",
    "missing_base_model",
    "unknown_key",
    "bad_parameter_type",
    "unknown_dtype",
    "slices_with_models",
    "layer_range_past_the_depth",
]


@pytest.mark.parametrize("case_name", RECIPE_CASES)
def test_bad_recipe(case_name, models, tmp_path, monkeypatch, capsys):
    recipe, needles = recipe_cases(models)[case_name]
    path = write_recipe(tmp_path, recipe)
    out = output_path(tmp_path)
    with pytest.raises(RecipeError) as caught:
        splice.merge(path, out, device="cpu")
    assert_one_line_message(caught.value, needles)
    assert_nothing_written(out)
    code, _, err = run_cli(["merge", path, "--out", out, "--device", "cpu", "--quiet"], monkeypatch, capsys)
    assert_one_line_error(code, err, needles)
    assert_nothing_written(out)


def test_recipe_not_yaml_and_missing(models, tmp_path, monkeypatch, capsys):
    out = output_path(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("merge_method: [linear\nmodels: {")
    code, _, err = run_cli(["merge", broken, "--out", out, "--quiet"], monkeypatch, capsys)
    assert_one_line_error(code, err, [str(broken), "YAML"])
    code, _, err = run_cli(["merge", tmp_path / "nope.yaml", "--out", out, "--quiet"], monkeypatch, capsys)
    assert_one_line_error(code, err, ["recipe not found", str(tmp_path / "nope.yaml")])
    assert_nothing_written(out)


def test_valid_recipe_control(models, tmp_path):
    """The recipes above fail for the reason named, not for something else: a correct one merges."""
    base, tuned = str(models.bert[0]), str(models.bert[1])
    entries = [{"model": tuned, "parameters": {"weight": 1.0, "density": 0.5}}]
    path = write_recipe(tmp_path, {"merge_method": "ties", "base_model": base, "models": entries})
    report = splice.merge(path, output_path(tmp_path), device="cpu")
    assert (report.out / "model.safetensors").exists()


# -- bad options ---------------------------------------------------------------------------------


OPTION_CASES = {
    "too_few_weights": (["--weights", "1.0"], ["1 weights", "2 models"]),
    "too_many_weights": (["--weights", "1,2,3"], ["3 weights", "2 models"]),
    "weights_sum_to_zero": (["--weights", "1,-1"], ["sum to zero"]),
    "weights_not_numbers": (["--weights", "a,b"], ["--weights", "'a,b'"]),
    "weights_not_finite": (["--weights", "1,nan"], ["finite"]),
    "shard_size_words": (["--shard-size", "abc"], ["'abc'"]),
    "shard_size_negative": (["--shard-size=-1"], ["'-1'"]),
    "shard_size_zero": (["--shard-size", "0"], ["positive", "'0'"]),
    "shard_size_unit": (["--shard-size", "2XB"], ["'2XB'"]),
    "device_cuda": (["--device", "cuda"], ["cuda", "no CUDA GPU"]),
    "device_cuda_index": (["--device", "cuda:1"], ["cuda:1", "no CUDA GPU"]),
    "device_unknown": (["--device", "tpu9"], ["tpu9", "unknown device"]),
    "dtype_unknown": (["--dtype", "int3"], ["int3", "dtype"]),
}


@pytest.mark.parametrize("case_name", OPTION_CASES)
def test_bad_option_from_cli(case_name, models, tmp_path, monkeypatch, capsys):
    if case_name.startswith("device_cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    options, needles = OPTION_CASES[case_name]
    out = output_path(tmp_path)
    args = ["soup", *models.bert, "--out", out, "--quiet"]
    if not any(o.startswith("--device") for o in options):
        args += ["--device", "cpu"]
    code, _, err = run_cli(args + options, monkeypatch, capsys)
    assert_one_line_error(code, err, needles)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"weights": [1.0]}, ["1 weights", "2 models"]),
        ({"weights": [1.0, 2.0, 3.0]}, ["3 weights", "2 models"]),
        ({"weights": [0.5, -0.5]}, ["sum to zero"]),
        ({"weights": [1.0, float("inf")]}, ["finite"]),
        ({"device": "cuda"}, ["no CUDA GPU"]),
        ({"dtype": "int3"}, ["int3"]),
    ],
    ids=["too_few_weights", "too_many_weights", "zero_sum", "infinite_weight", "cuda", "dtype"],
)
def test_bad_option_from_python(kwargs, needles, models, tmp_path):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = output_path(tmp_path)
    with pytest.raises(SpliceError) as caught:
        splice.soup(models.bert, out, **{"device": "cpu", **kwargs})
    assert_one_line_message(caught.value, needles)
    assert_nothing_written(out)


def test_no_models_is_an_error(tmp_path):
    with pytest.raises(SpliceError, match="no models"):
        splice.soup([], output_path(tmp_path), device="cpu")
    assert_nothing_written(output_path(tmp_path))


# -- an existing --out ---------------------------------------------------------------------------


def existing_output(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = output_path(tmp_path)
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "notes.md").write_text("more")
    return out, snapshot(out)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_existing_out_is_refused_and_untouched(models, tmp_path, monkeypatch, capsys):
    out, before = existing_output(tmp_path)
    with pytest.raises(OutputExistsError) as caught:
        splice.soup(models.bert, out, device="cpu")
    assert_one_line_message(caught.value, [str(out), "`force=True`"])
    code, _, err = run_cli(["soup", *models.bert, "--out", out, "--device", "cpu", "--quiet"], monkeypatch, capsys)
    assert_one_line_error(code, err, [str(out), "--force"])
    assert snapshot(out) == before
    assert siblings(out) == []


def test_existing_out_is_replaced_with_force(models, tmp_path, monkeypatch, capsys):
    out, _ = existing_output(tmp_path)
    code, _, err = run_cli(
        ["soup", *models.bert, "--out", out, "--device", "cpu", "--quiet", "--force"], monkeypatch, capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert len(Checkpoint.open(out).tensors) == len(load_file(models.bert[0] / "model.safetensors"))
    assert siblings(out) == []


def test_force_with_a_failing_merge_keeps_the_old_output(models, tmp_path, monkeypatch, capsys):
    out, before = existing_output(tmp_path)
    code, _, err = run_cli(
        ["soup", models.bert[0], models.bert_wide, "--out", out, "--device", "cpu", "--quiet", "--force"],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(code, err, ["shape"])
    assert snapshot(out) == before
    assert siblings(out) == []


def test_out_is_an_existing_file(models, tmp_path):
    out = output_path(tmp_path)
    out.parent.mkdir(parents=True)
    out.write_text("not a directory")
    with pytest.raises(OutputExistsError, match=str(out)):
        splice.soup(models.bert, out, device="cpu")
    with pytest.raises(OutputExistsError, match="not a directory"):
        splice.soup(models.bert, out, device="cpu", force=True)
    assert out.read_text() == "not a directory"


# -- failures in the middle of a merge -----------------------------------------------------------


def test_exception_while_reading_leaves_nothing(models, tmp_path, monkeypatch):
    """A read failing on the 5th tensor (on the read-ahead thread) propagates; nothing is published."""
    original = Checkpoint.read
    calls = []

    def failing_read(self, name, rows=None):
        calls.append(name)
        if len(calls) == 5:
            raise CheckpointError(f"{self.location}: simulated failure reading {name}")
        return original(self, name, rows)

    monkeypatch.setattr(Checkpoint, "read", failing_read)
    out = output_path(tmp_path)
    with pytest.raises(CheckpointError, match="simulated failure"):
        splice.soup(models.bert_sharded, out, device="cpu")
    assert len(calls) >= 5
    assert_nothing_written(out)


@pytest.mark.parametrize("error", [OSError("disk on fire"), KeyboardInterrupt()], ids=["OSError", "Ctrl-C"])
def test_non_splice_error_mid_merge_leaves_nothing(error, models, tmp_path):
    """Any exception, even KeyboardInterrupt, raised once tensors were written removes the partial dir."""
    out = output_path(tmp_path)
    seen = []

    class Failing:
        def start(self, description, total_items, total_bytes):
            pass

        def advance(self, items, nbytes):
            seen.extend(p.name for p in out.parent.iterdir())
            if len(seen) >= 3:
                raise error

        def finish(self):
            pass

    with pytest.raises(type(error)):
        splice.soup(models.bert, out, device="cpu", progress=Failing())
    assert any(name.startswith(f".{OUT_NAME}.splice-partial-") for name in seen), seen
    assert_nothing_written(out)


def test_file_truncated_during_merge(models, tmp_path):
    """A shard that shrinks after its header was checked: a one-line error naming file and tensor."""
    model = models.copy(models.bert[1], tmp_path)
    out = output_path(tmp_path)
    shard = model / "model.safetensors"
    header, _ = read_header(shard)
    data_start = shard.stat().st_size - sum(
        header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in tensors_by_offset(header)
    )

    class Truncating:
        def start(self, description, total_items, total_bytes):
            with open(shard, "r+b") as handle:
                handle.truncate(data_start + 100)

        def advance(self, items, nbytes):
            pass

        def finish(self):
            pass

    with pytest.raises(CheckpointError) as caught:
        splice.soup([models.bert[0], model], out, device="cpu", progress=Truncating(), read_ahead_depth=1)
    assert_one_line_message(caught.value, [str(model), "model.safetensors", "tensor"])
    assert_nothing_written(out)


KILLED_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import splice

    marker = Path(sys.argv[4])

    class Slow:
        def start(self, description, total_items, total_bytes):
            pass

        def advance(self, items, nbytes):
            marker.touch()  # at least one tensor is in the partial directory
            time.sleep(0.3)

        def finish(self):
            pass

    splice.soup([sys.argv[1], sys.argv[2]], sys.argv[3], device="cpu", progress=Slow())
""")


def test_killed_merge_publishes_nothing(models, tmp_path):
    out = output_path(tmp_path)
    marker = tmp_path / "started"
    script = tmp_path / "slow_soup.py"
    script.write_text(KILLED_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), *map(str, models.bert), str(out), str(marker)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(splice.__file__).parents[1])},
    )
    try:
        wait_for_marker(process, marker)
        partial = [p for p in out.parent.iterdir() if p.name.startswith(f".{OUT_NAME}.splice-partial-")]
        assert len(partial) == 1 and partial[0].is_dir()
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()

    assert not out.exists()
    left = sorted(p.name for p in out.parent.iterdir())
    assert all(name.startswith(f".{OUT_NAME}.splice-partial-") for name in left), left
    # What is left is hidden and is not a model a loader would pick up by the output's name.
    assert all(name != OUT_NAME and name.startswith(".") for name in left)
    with pytest.raises(CheckpointError, match="not found"):
        Checkpoint.open(out)
