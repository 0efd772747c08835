"""`splice inspect` of a mask patch: where its entries lie per layer and module type, counted from the mask bits, as
a table, as JSON and as a PNG heat map written by the output rule."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.numpy import load_file

import splice
from splice.arch.layers import layer_module, outside_modules
from splice.cli.render import placement_table
from splice.sparsify import count_selected, pack_mask, unpack_mask
from splice.workflows.inspect import summarize_patch

from conftest import perturbed, save, tiny_model
from helpers import run_cli

# changes far above the noise, so a model-wide top-k mask must select them: rows outside the layers
PLANTED = {"bert.embeddings.word_embeddings.weight": 7, "classifier.weight": 5}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect-mask")
    base = tiny_model("bert", 0)
    tuned = perturbed(base, 3)
    with torch.no_grad():
        for name, count in PLANTED.items():
            tuned.state_dict()[name].view(-1)[:count] += 1.0
    paths = {"base": save(base, root / "base", sharded=False), "tuned": save(tuned, root / "tuned", sharded=False)}
    for kind, arguments in (("mask", {"mask_scope": "model", "density": 0.02}), ("layernorm", {})):
        splice.extract_patch(paths["base"], paths["tuned"], kind=kind, **arguments).save(root / kind)
        paths[kind] = root / kind
    return paths


def independent_cells(patch: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """(row, module type) -> (mask bits set, entries), from the stored bytes with numpy and the names parsed here."""
    shapes = json.loads((patch / "patch.json").read_text())["settings"]["shapes"]
    stored = load_file(patch / "tensors.safetensors")
    cells: dict[tuple[str, str], tuple[int, int]] = {}
    for name, shape in shapes.items():
        count = int(np.prod(shape))
        bits = np.unpackbits(stored[name + ".mask"], bitorder="little")[:count]
        inside = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
        if inside:
            key = (inside.group(1), inside.group(2))
        else:
            module = {"bert.embeddings": "embeddings", "bert.pooler": "pooler", "classifier": "classifier"}[
                next(p for p in ("bert.embeddings", "bert.pooler", "classifier") if name.startswith(p + "."))
            ]
            key = (module, module)
        selected, entries = cells.get(key, (0, 0))
        cells[key] = (selected + int(bits.sum()), entries + count)
    return cells


def test_placement_counts_each_layer_and_module_from_the_mask_bits(made):
    placement = summarize_patch(made["mask"]).placement
    assert placement is not None
    expected = independent_cells(made["mask"])
    found = {
        (row.name, module): (cell.selected, cell.entries)
        for row in placement.rows
        for module, cell in row.cells.items()
    }
    assert found == expected
    for row in placement.rows:
        for cell in row.cells.values():
            assert cell.share == cell.selected / cell.entries
    # embeddings before the layers, the head after them; the module types are the layers' own
    rows = {row for row, _ in expected}
    assert [row.name for row in placement.rows] == [
        row for row in ("embeddings", "0", "1", "pooler", "classifier") if row in rows
    ]
    assert {module for (row, module) in expected if row.isdigit()} == set(placement.modules)
    assert "classifier" not in placement.modules and "embeddings" not in placement.modules
    kept = json.loads((made["mask"] / "patch.json").read_text())["settings"]["kept"]
    assert placement.total.selected == sum(kept.values()) == sum(s for s, _ in expected.values())
    assert placement.total.entries == sum(e for _, e in expected.values())
    for module, column in placement.columns.items():
        assert (column.selected, column.entries) == tuple(
            map(sum, zip(*(v for (row, m), v in expected.items() if m == module)))
        )


def test_entries_outside_the_layers_land_in_their_modules_rows(made):
    placement = summarize_patch(made["mask"]).placement
    assert placement is not None
    rows = {row.name: row for row in placement.rows}
    assert rows["classifier"].layer is None and rows["embeddings"].layer is None
    assert rows["classifier"].total.selected >= PLANTED["classifier.weight"]
    assert rows["embeddings"].total.selected >= PLANTED["bert.embeddings.word_embeddings.weight"]
    assert [row.name for row in placement.rows][0] == "embeddings" and placement.rows[-1].name == "classifier"


def test_cli_prints_the_table_and_json_gives_the_numbers(made, monkeypatch, capsys):
    code, out, err = run_cli(["inspect", made["mask"]], monkeypatch, capsys)
    assert code == 0, err
    assert "where the mask's entries lie" in out
    code, out, err = run_cli(["inspect", made["mask"], "--json"], monkeypatch, capsys)
    assert code == 0, err
    given = json.loads(out)["placement"]
    expected = independent_cells(made["mask"])
    assert {
        (row["name"], module): (cell["selected"], cell["entries"])
        for row in given["rows"]
        for module, cell in row["cells"].items()
    } == expected
    assert given["total"]["selected"] == sum(s for s, _ in expected.values())
    # the table's cells: each row's counts in the module columns' order, then its total
    placement = summarize_patch(made["mask"]).placement
    assert placement is not None
    console = Console(width=400, file=io.StringIO())
    console.print(placement_table(placement))
    lines = {line.split("│")[1].strip(): line for line in console.file.getvalue().splitlines() if "│" in line}
    for row in placement.rows:
        cells = [part.strip() for part in lines[row.name].split("│")[2:-1]]
        wanted = [str(expected[(row.name, m)][0]) if (row.name, m) in expected else "" for m in placement.modules]
        assert cells[:-2] == wanted and cells[-2] == str(row.total.selected)
    assert lines["total"].split("│")[-3].strip() == str(sum(s for s, _ in expected.values()))


def test_plot_writes_a_png_heat_map_by_the_output_rule(made, tmp_path, monkeypatch, capsys):
    plot = tmp_path / "where.png"
    code, out, err = run_cli(["inspect", made["mask"], "--plot", plot], monkeypatch, capsys)
    assert code == 0, err
    with Image.open(plot) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.load()
    assert 400 <= width <= 4000 and 200 <= height <= 4000
    before = plot.stat()
    code, out, err = run_cli(["inspect", made["mask"], "--plot", plot], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "already exists" in err and "--force" in err
    assert plot.stat().st_ino == before.st_ino and plot.stat().st_mtime_ns == before.st_mtime_ns
    code, out, err = run_cli(["inspect", made["mask"], "--plot", plot, "--force"], monkeypatch, capsys)
    assert code == 0, err
    assert plot.stat().st_ino != before.st_ino
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (width, height)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["where.png"]


@pytest.mark.parametrize(
    "what, plot, needle",
    [
        ("layernorm", "where.png", "is a layernorm patch, not a mask patch"),
        ("base", "where.png", "is not a patch"),
        ("mask", "where.jpg", "is not a .png file"),
    ],
)
def test_plot_is_refused_before_anything_is_written(made, tmp_path, monkeypatch, capsys, what, plot, needle):
    code, out, err = run_cli(["inspect", made[what], "--plot", tmp_path / plot], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and "--plot" in err, err
    assert list(tmp_path.iterdir()) == []


def test_plot_is_never_written_inside_the_patch(made, monkeypatch, capsys):
    before = sorted(p.name for p in made["mask"].iterdir())
    plot = made["mask"] / "where.png"
    code, _, err = run_cli(["inspect", made["mask"], "--plot", plot, "--force"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is inside the patch" in err, err
    assert sorted(p.name for p in made["mask"].iterdir()) == before


def test_count_selected_counts_set_bits_and_ignores_padding():
    generator = torch.Generator().manual_seed(5)
    for shape in [(1,), (7,), (9,), (5, 3), (1000,)]:
        mask = torch.rand(shape, generator=generator) < 0.3
        packed = pack_mask(mask)
        assert count_selected(packed, shape) == int(mask.sum())
        dirty = packed.clone()
        dirty[-1] |= 0xFF  # padding bits set by another writer must not count
        assert count_selected(dirty, shape) == int(unpack_mask(dirty, shape).sum())


@pytest.mark.parametrize(
    "arch, expected",
    [
        (
            "llama",
            {
                "model.embed_tokens.weight": (None, "embed_tokens"),
                "model.layers.1.self_attn.q_proj.weight": ("self_attn.q_proj", None),
                "model.layers.0.post_attention_layernorm.weight": ("post_attention_layernorm", None),
                "model.norm.weight": (None, "norm"),
                "lm_head.weight": (None, "lm_head"),
            },
        ),
        (
            "gpt2",
            {
                "transformer.wte.weight": (None, "wte"),
                "transformer.h.1.mlp.c_fc.weight": ("mlp.c_fc", None),
                "transformer.ln_f.bias": (None, "ln_f"),
            },
        ),
        (
            "vit",
            {
                "vit.embeddings.cls_token": (None, "embeddings"),
                "vit.embeddings.patch_embeddings.projection.weight": (None, "embeddings"),
                "vit.layers.0.attention.q_proj.bias": ("attention.q_proj", None),
                "vit.layernorm.weight": (None, "layernorm"),
                "classifier.weight": (None, "classifier"),
            },
        ),
    ],
)
def test_module_names_inside_and_outside_the_layers(arch, expected):
    names = list(tiny_model(arch, 0).state_dict())
    assert set(expected) <= set(names)
    outside = outside_modules(names)
    for name, (inside, outer) in expected.items():
        assert layer_module(name) == inside
        if outer is not None:
            assert outside(name) == outer
