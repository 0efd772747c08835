"""The PortLLM study (examples/port_evolving.py) in its --quick configuration, run in-process: the JSON has every
row, its numbers are in range and agree with each other, and the ported models and their scores agree with an
independent theta_N + (alpha/r) B A computed here and scored by greedy decoding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import port_evolving
import pytest
import torch
import transformers
from safetensors.torch import load_file

BASES = [f"v{n}" for n in range(2, port_evolving.QUICK.rounds + 2)]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("port-evolving")
    port_evolving.main(["--out", str(out), "--quick"])
    return json.loads((out / "port_evolving.json").read_text()), out


@pytest.fixture(scope="module")
def test_sets() -> dict[str, list[tuple[str, str]]]:
    cfg = port_evolving.QUICK
    text = port_evolving.read_bytes(port_evolving.corpus_parts(cfg.rounds)["v1"], cfg.corpus_bytes, cfg.seed)
    _, words = port_evolving.task_words(port_evolving.split_lm(text)[0], cfg)
    return {name: [make(w) for w in words] for name, make in port_evolving.TASKS.items()}


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def lora_updates(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Stored base tensor name -> (alpha / r) * B @ A for every LoRA pair in the adapter, from its files alone."""
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    lora = load_file(adapter_dir / "adapter_model.safetensors")
    return {
        key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight"): conf["lora_alpha"]
        / conf["r"]
        * (lora[key.replace("lora_A", "lora_B")] @ lora[key])
        for key in lora
        if "lora_A" in key
    }


def theta_plus_delta(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    theta = tensors(base_dir)
    for name, update in lora_updates(adapter_dir).items():
        theta[name] = theta[name] + update
    return theta


@torch.no_grad()
def independent_scores(model, pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """Greedy decoding of len(answer) bytes after each prompt, one unpadded prompt at a time (exact answers
    counted), and the mean cross-entropy of the answer bytes given the prompt."""
    hits, nll, count = 0, 0.0, 0
    for prompt, answer in pairs:
        p, a = list(prompt.encode()), list(answer.encode())
        ids = torch.tensor([p])
        for _ in a:
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
        hits += ids[0, len(p) :].tolist() == a
        logits = model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1 : -1]
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(a), reduction="sum").item()
        count += len(a)
    return hits / len(pairs), nll / count


def check(model, pairs: list[tuple[str, str]], accuracy: float, loss: float) -> None:
    got_accuracy, got_loss = independent_scores(model, pairs)
    assert got_accuracy == pytest.approx(accuracy)
    assert got_loss == pytest.approx(loss, rel=1e-4)


def model_with(base_dir: Path, state: dict[str, torch.Tensor]):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model.load_state_dict(state, strict=True)
    return model


def test_every_row_for_every_task_and_base(study):
    results, out = study
    assert set(results["tasks"]) == set(port_evolving.TASKS)
    assert set(results["bases"]) == {"v1", *BASES}
    for task in results["tasks"].values():
        assert set(task["rounds"]) == set(BASES)
        assert 0.0 <= task["v1_unpatched"] <= 1.0
        for row in task["rounds"].values():
            for key in port_evolving.ROWS:
                assert 0.0 <= row[key] <= 1.0
            assert row["v1_patched"] == task["v1_patched"]
            assert row["gap_refit_minus_ported"] == pytest.approx(row["refit"] - row["ported"])
            assert row["delta"]["rel_diff"] >= 0.0 and -1.0 - 1e-9 <= row["delta"]["cosine"] <= 1.0 + 1e-9
            assert row["porter"] == results["porter"]
            for cost in (row["port_cost"], row["refit_cost"]):
                assert cost["seconds"] > 0.0 and cost["peak_rss_mb"] >= cost["rss_at_start_mb"] > 0.0
                assert cost["peak_above_start_mb"] == pytest.approx(cost["peak_rss_mb"] - cost["rss_at_start_mb"])
            if results["porter"] == "splice.port":
                assert row["drift_report"] is not None
    for base in BASES:
        assert results["bases"][base]["rel_change_from_v1"] > 0.0
    assert (out / "port_evolving.png").stat().st_size > 10_000


@pytest.mark.parametrize("task", list(port_evolving.TASKS))
def test_ported_models_are_theta_n_plus_the_v1_update(study, test_sets, task):
    results, out = study
    models = out / "models"
    for base in BASES:
        expected = theta_plus_delta(models / base, models / f"{task}-lora-v1")
        ported = tensors(models / f"{task}-ported-{base}")
        assert set(ported) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(ported[name].float(), value, rtol=0, atol=1e-6, msg=name)
        row = results["tasks"][task]["rounds"][base]
        check(model_with(models / base, expected), test_sets[task], row["ported"], row["answer_loss"]["ported"])


@pytest.mark.parametrize("task", list(port_evolving.TASKS))
def test_patched_and_unpatched_scores_and_delta_drift(study, test_sets, task):
    results, out = study
    models, entry = out / "models", results["tasks"][task]
    v1_patched = model_with(models / "v1", theta_plus_delta(models / "v1", models / f"{task}-lora-v1"))
    check(v1_patched, test_sets[task], entry["v1_patched"], entry["answer_loss"]["v1_patched"])
    for base in BASES:
        row = entry["rounds"][base]
        refit = model_with(models / base, theta_plus_delta(models / base, models / f"{task}-lora-{base}"))
        check(refit, test_sets[task], row["refit"], row["answer_loss"]["refit"])
        unpatched = model_with(models / base, tensors(models / base))
        check(unpatched, test_sets[task], row["unpatched"], row["answer_loss"]["unpatched"])
        d1, dn = (lora_updates(models / f"{task}-lora-{version}") for version in ("v1", base))
        d1, dn = (torch.cat([d[name].flatten() for name in sorted(d)]) for d in (d1, dn))
        assert math.isclose(((dn - d1).norm() / d1.norm()).item(), row["delta"]["rel_diff"], rel_tol=1e-4)
        assert math.isclose(
            torch.dot(d1, dn).item() / (d1.norm() * dn.norm()).item(),
            row["delta"]["cosine"],
            rel_tol=1e-4,
            abs_tol=1e-6,
        )
