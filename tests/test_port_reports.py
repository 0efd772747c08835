"""A port's scores, inputs and records (issue 16, items 5, 9, 11, 20, 21): scores checked when the hook returns
them, non-finite bases refused, the drift report says unknown rather than a made-up number, its table and verdict
agree, and records keep absolute locations."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_port import lineage_setup

import splice
from splice.adapters.drift import MAX_PLOT_ROWS, DriftReport, TensorDrift, percent
from splice.adapters.extract import extract_patch_to
from splice.registry.store import Registry
from splice.tensors.partials import PARTIAL

from conftest import perturbed, save, tiny_model
from helpers import run_cli


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


# -- item 5: a score that is not a finite number stops the command before anything is written ----------------


@pytest.mark.parametrize("value", ["float('inf')", "float('-inf')", "float('nan')"])
def test_a_non_finite_score_is_refused_before_the_port_is_written(value, tmp_path, monkeypatch, capsys):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama", sharded=False)
    extract_patch_to(tmp_path / "patch", v1, tuned, "lora", rank=2)
    registry = tmp_path / "registry"
    Registry.init(registry).push("chat", tmp_path / "patch")
    hook = tmp_path / "score.py"
    hook.write_text(f"def score(state):\n    return {value}\n")
    code, _, err = run_cli(
        [
            "port",
            "chat@1",
            "--to",
            v2,
            "--from",
            v1,
            "--out",
            tmp_path / "out",
            "--registry",
            registry,
            "--eval",
            f"{hook}:score",
            "-q",
        ],
        monkeypatch,
        capsys,
    )
    line = one_error_line(code, err)
    assert f"--eval {hook}:score returned {float(eval(value))}" in line and "finite" in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(f"*{PARTIAL}*"))
    assert Registry.open(registry).health("chat") == ([], [])


def test_greedy_soup_refuses_a_non_finite_score_by_the_same_check(make_models, tmp_path, monkeypatch, capsys):
    dirs = [str(d) for d in make_models("bert", 3)]
    hook = tmp_path / "score.py"
    hook.write_text(
        "calls = []\n\n\ndef score(state):\n    calls.append(1)\n    return 1.0 if len(calls) <= 3 else float('inf')\n"
    )  # the ingredients, then a soup: inf
    code, _, err = run_cli(
        ["soup", *dirs, "--greedy", "--eval", f"{hook}:score", "--out", tmp_path / "greedy", "--device", "cpu", "-q"],
        monkeypatch,
        capsys,
    )
    assert f"--eval {hook}:score returned inf" in one_error_line(code, err)
    assert not (tmp_path / "greedy").exists()

    def held_out(state):
        return math.nan

    with pytest.raises(
        splice.SpliceError, match=r"`evaluate` .*held_out returned nan for .*: a score must be a finite"
    ):
        splice.greedy_soup(dirs, tmp_path / "greedy", held_out, device="cpu")  # named by its function
    assert not (tmp_path / "greedy").exists()


# -- item 9: a base holding NaN/Inf where the patch writes is refused --------------------------------------


@pytest.mark.parametrize("which", ["new", "old"])
def test_a_non_finite_base_value_where_the_patch_writes_is_refused(which, tmp_path, monkeypatch, capsys):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama", sharded=False)
    extract_patch_to(tmp_path / "patch", v1, tuned, "delta")
    poisoned = v2 if which == "new" else v1
    state = load_file(poisoned / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    state[name][2, 3] = math.nan
    save_file(state, poisoned / "model.safetensors", metadata={"format": "pt"})
    args = [
        "port",
        tmp_path / "patch",
        "--to",
        v2,
        "--out",
        tmp_path / "out",
        "--as-patch",
        tmp_path / "ported",
        "--report",
        tmp_path / "report",
        "-q",
    ]
    if which == "old":
        args += ["--from", v1]
        # the old base's bytes no longer match the patch's fingerprint: refused for that first when recorded
        meta = json.loads((tmp_path / "patch" / "patch.json").read_text())
        meta["base"]["tensors"] = [t for t in meta["base"]["tensors"] if t["name"] != name]
        (tmp_path / "patch" / "patch.json").write_text(json.dumps(meta))
    code, _, err = run_cli(args, monkeypatch, capsys)
    line = one_error_line(code, err)
    assert f"{poisoned} holds NaN/Inf in {name}, a tensor the patch changes" in line, line
    assert not any((tmp_path / p).exists() for p in ("out", "ported", "report"))


# -- item 11: unknown is said, cosines stay in [-1, 1], the plot separates matrices from vectors ------------------


def test_a_peft_adapter_without_from_has_unknown_figures_not_made_up_ones(tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("bert", 0)
    save(base, tmp_path / "v1", sharded=False)
    v2 = save(perturbed(base, 3, 0.01), tmp_path / "v2", sharded=False)
    adapter = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["query", "value"])
    )
    adapter.save_pretrained(tmp_path / "adapter")
    code, out, err = run_cli(
        ["port", tmp_path / "adapter", "--to", v2, "--as-patch", tmp_path / "ported"], monkeypatch, capsys
    )
    assert code == 0, err
    report = json.loads((tmp_path / "ported" / "port_report.json").read_text())
    assert report["base_change_at_least"] is None and report["verdict"] == "unmeasured"
    assert all(t["old_norm"] is None and t["base_change_at_least"] is None for t in report["per_tensor"])
    for t in report["per_tensor"]:  # what is known is measured: ||W'|| of the new base itself
        assert t["new_norm"] == pytest.approx(
            float(load_file(v2 / "model.safetensors")[t["name"]].double().norm()), rel=1e-6
        )
    said = " ".join(out.split())
    assert "│ base change │ unknown (no record of the old base:" in said, said
    assert said.count("│ unknown │") == len(report["per_tensor"]) == 4
    assert "0.00%" not in said


def test_cosines_are_held_to_their_range():
    # rounding of the sums can give |cos| a hair above 1 when the base moved exactly along the update
    drift = TensorDrift("w", 1.0, 2.0, 1.0, 1.0, 1.0000000053, True, (2, 2))
    against = TensorDrift("v", 1.0, 2.0, 1.0, 1.0, -1.0000000053, True, (2,))
    assert drift.cosine == 1.0 and against.cosine == -1.0
    report = DriftReport("p", "delta", "new", "", "old", "d", 1.0, [drift])
    assert report.cosine == 1.0


def test_a_port_along_its_own_update_reports_a_cosine_of_at_most_one(tmp_path):
    v1, tuned, _ = lineage_setup(tmp_path, "llama", sharded=False)
    extract_patch_to(tmp_path / "patch", v1, tuned, "delta")
    drift = splice.port_patch(tmp_path / "patch", tuned, as_patch=tmp_path / "ported", old_base=v1).drift
    cosines = [t.cosine for t in drift.tensors] + [drift.cosine]
    assert all(-1 <= c <= 1 for c in cosines) and min(cosines) == pytest.approx(1.0, abs=1e-6)
    stored = json.loads((tmp_path / "ported" / "port_report.json").read_text())
    assert all(-1 <= t["cosine"] <= 1 for t in stored["per_tensor"]) and stored["cosine"] <= 1


def test_the_plot_draws_matrices_and_vectors_apart_and_groups_many_tensors_by_layer():
    small = [TensorDrift(f"layer.{i}.dense.weight", 10.0, 10.1, 0.5, 0.1, 0.0, True, (4, 4)) for i in range(3)]
    biases = [TensorDrift(f"layer.{i}.dense.bias", 0.001, 0.002, 0.04, 0.001, 0.0, True, (4,)) for i in range(3)]
    report = DriftReport("p", "delta", "new", "", "old", "d", 1.0, small + biases)
    panels = report._panels()
    assert [title for title, _ in panels] == ["matrices", "vectors (biases, norms, scales)"]
    assert [label for label, _ in panels[0][1]] == [t.name for t in small]
    many = [
        TensorDrift(f"encoder.layer.{i // 8}.t{i % 8}.weight", 1.0, 1.0, 0.1, 0.01, 0.0, True, (2, 2))
        for i in range(MAX_PLOT_ROWS + 8)
    ]
    [(title, rows)] = DriftReport("p", "delta", "new", "", "old", "d", 1.0, many)._panels()
    assert title == f"matrices, per layer ({len(many)} tensors)" and len(rows) == len(many) // 8
    assert rows[0][0] == "layer 0 (8 tensors)"
    twelve_layers = [
        TensorDrift(f"model.layers.{i // 6}.t{i % 6}.weight", 1.0, 1.0, 0.1, 0.01, 0.0, True, (2, 2))
        for i in range(12 * 6)
    ]
    stored_order = sorted(twelve_layers, key=lambda t: t.name)  # as a checkpoint lists them: 10 and 11 before 2
    [(_, rows)] = DriftReport("p", "delta", "new", "", "old", "d", 1.0, stored_order)._panels()
    assert [label for label, _ in rows] == [f"layer {i} (6 tensors)" for i in range(12)]
    assert rows[0][1].base_change == pytest.approx(0.01) and rows[0][1].update_share == pytest.approx(0.1)
    assert report.files()["port_report.png"][:4] == b"\x89PNG"


# -- item 20: the table and the verdict give the same figure ---------------------------------------------


def test_a_port_without_from_says_the_same_lower_bound_in_the_table_and_the_verdict(tmp_path, monkeypatch, capsys):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama", sharded=False)
    extract_patch_to(tmp_path / "patch", v1, tuned, "lora", rank=2)
    code, out, err = run_cli(
        ["port", tmp_path / "patch", "--to", v2, "--as-patch", tmp_path / "ported"], monkeypatch, capsys
    )
    assert code == 0, err
    report = json.loads((tmp_path / "ported" / "port_report.json").read_text())
    least = percent(report["base_change_at_least"])
    said = " ".join(out.split())
    assert f"at least {least} (norms only)" in said and least != "0.00%"
    assert f"the base moved at least {least} in the" in report["reason"] and "at most" not in report["reason"]


# -- item 21: records keep absolute locations --------------------------------------------------------------


def test_relative_paths_are_recorded_absolute(tmp_path, monkeypatch, capsys):
    v1, tuned, v2 = lineage_setup(tmp_path, "llama", sharded=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert (
        run_cli(
            [
                "patch",
                "extract",
                "--base",
                "../v1",
                "--tuned",
                "../tuned",
                "--kind",
                "lora",
                "--rank",
                "2",
                "--out",
                "patch",
                "-q",
            ],
            monkeypatch,
            capsys,
        )[0]
        == 0
    )
    extracted = splice.Patch.load(work / "patch")
    assert extracted.meta.lineage == [str(v1), str(tuned)]
    code, _, err = run_cli(
        ["port", "patch", "--to", "../v2", "--from", "../v1", "--as-patch", "ported", "-q"], monkeypatch, capsys
    )
    assert code == 0, err
    ported = splice.Patch.load(work / "ported")
    assert ported.meta.lineage[-1].startswith(f"ported from {work / 'patch'} (base digest ")
    report = json.loads((work / "ported" / "port_report.json").read_text())
    assert (report["patch"], report["new_base"], report["old_base"]) == (str(work / "patch"), str(v2), str(v1))
    Registry.init(tmp_path / "registry").push("chat", work / "ported")
    code, _, err = run_cli(
        ["deploy", "chat@1", "--base", "../v2", "--out", "deployed", "--registry", "../registry", "-q"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    record = json.loads((work / "deployed" / "deployment.json").read_text())
    assert record["base"] == str(v2) and record["patches"][0]["base_digest"] == ported.meta.base.digest
    [health], _ = Registry.open(tmp_path / "registry").health("chat")
    assert (health.base, health.output, health.base_digest) == (
        str(v2),
        str(work / "deployed"),
        ported.meta.base.digest,
    )
    assert Path(record["registry"]).is_absolute() or "://" in record["registry"]
