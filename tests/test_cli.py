"""The command line's success paths: each command gives what the Python call gives."""

from __future__ import annotations

import textwrap

import torch
import yaml

import splice

from helpers import load_dir, run_cli


def test_cli_weighted_soup_equals_the_python_call(make_models, tmp_path, monkeypatch, capsys):
    dirs = make_models("bert", 3)
    code, out, _ = run_cli(
        [
            "soup",
            *dirs,
            "--out",
            tmp_path / "cli",
            "--weights",
            "0.5,0.3,0.2",
            "--dtype",
            "float16",
            "--device",
            "cpu",
            "--shard-size",
            "10KB",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0
    assert "soup" in out and "tensors" in out
    splice.soup(dirs, tmp_path / "py", weights=[0.5, 0.3, 0.2], dtype="float16", device="cpu", shard_size=10_000)
    cli, py = load_dir(tmp_path / "cli"), load_dir(tmp_path / "py")
    assert all(torch.equal(cli[n], py[n]) and cli[n].dtype == torch.float16 for n in py)
    assert len(list((tmp_path / "cli").glob("*.safetensors"))) > 1


def test_cli_greedy_soup_with_an_eval_file(make_models, tmp_path, monkeypatch, capsys):
    dirs = make_models("llama", 3)
    scorer = tmp_path / "heldout.py"
    scorer.write_text(
        textwrap.dedent("""
        def score(state, model_dir):
            assert model_dir  # the first ingredient's directory, for its config
            return -float(state["model.norm.weight"].sub(1.01).abs().sum())
    """)
    )
    code, out, _ = run_cli(
        ["soup", *dirs, "--out", tmp_path / "g", "--greedy", "--eval", f"{scorer}:score", "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert code == 0, out
    assert "greedy soup kept" in out
    report = splice.greedy_soup(dirs, tmp_path / "py", f"{scorer}:score", device="cpu")
    assert f"held-out score {report.soup_score:.4f}" in out
    cli, py = load_dir(tmp_path / "g"), load_dir(tmp_path / "py")
    assert all(torch.equal(cli[n], py[n]) for n in py)


def test_cli_merge_quiet_prints_nothing(make_models, tmp_path, monkeypatch, capsys):
    base, first, second = make_models("gpt2", 3)
    recipe = tmp_path / "ta.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(base),
                "models": [
                    {"model": str(first), "parameters": {"weight": 0.5}},
                    {"model": str(second), "parameters": {"weight": 0.5}},
                ],
            }
        )
    )
    code, out, err = run_cli(
        ["merge", recipe, "--out", tmp_path / "m", "--quiet", "--device", "cpu"], monkeypatch, capsys
    )
    assert (code, out, err) == (0, "", "")
    expected = {
        n: b + 0.5 * (f - b) + 0.5 * (s - b)
        for (n, b), f, s in zip(load_dir(base).items(), load_dir(first).values(), load_dir(second).values())
    }
    merged = load_dir(tmp_path / "m")
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)
