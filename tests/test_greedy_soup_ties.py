"""A greedy soup whose evaluation saturates keeps the untrained base on a tie (the paper's `>=` rule): the report
and the table say so, and `--strict` leaves it out."""

from __future__ import annotations

import textwrap

import splice

from helpers import run_cli

SATURATING_EVAL = textwrap.dedent("""
    from safetensors.torch import load_file

    BASE = load_file({base!r})


    def score(state):
        # how far from the untrained base, capped at 1: every fine-tune and every average of them scores 1.0
        moved = sum(float((state[name].float() - BASE[name].float()).abs().sum()) for name in BASE)
        return min(1.0, 1000 * moved)
""")


def test_a_saturated_greedy_soup_says_it_kept_the_base_on_a_tie(make_models, tmp_path, monkeypatch, capsys):
    base, *tuned = make_models("llama", 3)
    scorer = tmp_path / "saturating.py"
    scorer.write_text(SATURATING_EVAL.format(base=str(base / "model.safetensors")))

    report = splice.greedy_soup([base, *tuned], tmp_path / "loose", f"{scorer}:score", device="cpu")
    by_model = {step.model: step for step in report.steps}
    assert by_model[str(base)].score == 0.0
    assert (by_model[str(base)].kept, by_model[str(base)].tie) == (True, True)
    assert [(s.kept, s.tie) for s in report.steps] == [(True, False), (True, True), (True, True)]
    assert report.notes == [
        f"{s.model} was kept on a tie: the soup's score stayed 1.0000 (its own score {s.score:.4f}); a saturated "
        "evaluation keeps any ingredient, even an untrained base; --strict keeps only ingredients that raise the "
        "score"
        for s in report.steps[1:]
    ]

    strict = splice.greedy_soup([base, *tuned], tmp_path / "strict", f"{scorer}:score", strict=True, device="cpu")
    assert [s.kept for s in strict.steps] == [True, False, False] and strict.notes == []

    code, out, err = run_cli(
        ["soup", base, *tuned, "--out", tmp_path / "cli", "--greedy", "--eval", f"{scorer}:score", "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    text = " ".join(out.split())
    assert text.count("yes (tie)") == 2
    for note in report.notes:
        assert f"note: {' '.join(note.split())}" in text
