"""YAML files a user writes (merge recipes, continual pipelines), read through one loader: a syntax error keeps its
line and column, a mistyped top-level key is named with the nearest valid one and its line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import splice
from splice.errors import RecipeError, SpliceError
from splice.merge.recipe import load_recipe
from splice.workflows.continual.pipeline import load_pipeline

ENV = {**os.environ, "PYTHONPATH": str(Path(splice.__file__).parents[1]), "COLUMNS": "200"}

SYNTAX_ERRORS = [
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1, 2}\n",
        "4:31: not valid YAML: expected ',' or ']', but got '}' (while parsing a flow sequence at 4:26)",
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n bad: indent\n",
        "4:2: not valid YAML: expected <block end>, but found '<block mapping start>' "
        "(while parsing a block mapping at 1:1)",
    ),
    ("merge_method: linear\nmodels: a: b\n", "2:10: not valid YAML: mapping values are not allowed here"),
    ('merge_method: linear\nname: "x\x01"\n', "2:9: not valid YAML: special characters are not allowed (#x0001)"),
    (
        "merge_method: 'linear\n",
        "2:1: not valid YAML: found unexpected end of stream (while scanning a quoted scalar at 1:15)",
    ),
]


MISTYPED_KEYS = [
    (
        load_recipe,
        "merge_method: linear\n# the inputs\nmodles:\n  - model: a\n",
        "3: unknown key 'modles' (did you mean 'modules' or 'models'?)",  # as near to both: both named
    ),
    (
        load_recipe,
        "merge_method: linear\nmodels: [{model: a}]\nbase_modle: b\ndtype: [1]\nzzz: 1\n",
        "3: unknown key 'base_modle' (did you mean 'base_model'?) (+2 more)",
    ),
    (
        load_recipe,
        "merge_method: linear\nmodels: [{model: a}]\nzzz: 1\n",
        "3: unknown key 'zzz' (the keys are merge_method, models, slices, modules, base_model, parameters, dtype, "
        "out_dtype, compute, tokenizer_source, tokenizer, chat_template, name)",
    ),
    (
        load_pipeline,
        "base: ./model\nnmae: cl\ntasks:\n  - {name: t0, data: tasks.py:task_0}\nepochs: 2\n",
        "2: unknown key 'nmae' (did you mean 'name'?)",
    ),
    (
        load_pipeline,
        "base: ./model\nname: cl\ntasks:\n  - {name: t0, data: tasks.py:task_0}\n\nhead_lrr: 0.1\n",
        "6: unknown key 'head_lrr' (did you mean 'head_lr'?)",
    ),
]


@pytest.mark.parametrize(
    ("load", "text", "message"),
    [
        *((load, text, message) for load in (load_recipe, load_pipeline) for text, message in SYNTAX_ERRORS),
        *MISTYPED_KEYS,
    ],
)
def test_one_line_with_the_place_in_the_file(tmp_path, load, text, message):
    path = tmp_path / "file.yaml"
    path.write_text(text)
    with pytest.raises(SpliceError) as caught:
        load(path)
    assert str(caught.value) == f"{path}:{message}"
    assert load is not load_recipe or isinstance(caught.value, RecipeError)


def test_splice_merge_prints_the_line_and_column(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(SYNTAX_ERRORS[0][0])
    result = subprocess.run(
        [sys.executable, "-m", "splice", "merge", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: {path}:{SYNTAX_ERRORS[0][1]}\n"
    assert not (tmp_path / "out").exists()
