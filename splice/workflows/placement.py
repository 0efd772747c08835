"""Where a mask patch's entries lie: per layer and module type (the "where do skills live" picture of Panigrahi et
al., 2023), as numbers and as a PNG heat map. Rows are the layers of each stack, with the modules outside the layers
(embeddings before them; pooler, final norm, classifier after them) in rows of their own; columns are the module
types inside a layer (`attention.self.query`, `intermediate.dense`, `output.LayerNorm`, ...). A cell counts the
entries the mask selects among the entries of the tensors it covers there."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from math import prod
from typing import Any

from splice.adapters.kinds.mask import MASK_SUFFIX, covered_shapes
from splice.adapters.patch import Patch
from splice.arch.layers import before_layers, layer_container, layer_index, layer_module, outside_modules
from splice.plots import png_bytes
from splice.sparsify import count_selected

TOTAL = "all"  # the heat map's column of each row's modules together


@dataclass
class PlacementCell:
    selected: int = 0
    entries: int = 0  # of the tensors the patch covers in this cell

    @property
    def share(self) -> float:
        return self.selected / self.entries if self.entries else 0.0

    def add(self, selected: int, entries: int) -> None:
        self.selected += selected
        self.entries += entries


@dataclass
class PlacementRow:
    name: str  # the layer's index (with its stack's name where a model has several), or the module outside the layers
    layer: int | None  # None: a module outside the layers
    cells: dict[str, PlacementCell] = field(default_factory=dict)  # module type -> cell; only the types it covers

    @property
    def total(self) -> PlacementCell:
        return _summed(self.cells.values())


@dataclass
class MaskPlacement:
    modules: list[str]  # the columns: the module types inside the layers, in the order the patch lists them
    rows: list[PlacementRow]  # modules before the layers, the layers in order, modules after them

    @property
    def columns(self) -> dict[str, PlacementCell]:
        """Each module type over all layers."""
        return {
            module: _summed(row.cells[module] for row in self.rows if module in row.cells) for module in self.modules
        }

    @property
    def total(self) -> PlacementCell:
        return _summed(row.total for row in self.rows)

    def png(self) -> bytes:
        """The heat map: the share of each cell's entries selected, on a log colour scale, each cell's count on it."""
        return png_bytes(self._draw, size=(3.0 + 1.05 * (len(self.modules) + 1), 2.4 + 0.36 * len(self.rows)))

    def _draw(self, figure: Any) -> None:
        import matplotlib
        import numpy as np
        from matplotlib.colors import LogNorm

        columns = [*self.modules, TOTAL]
        cells = [[row.cells.get(module) for module in self.modules] + [row.total] for row in self.rows]
        shares = np.ma.masked_invalid(
            [[cell.share if cell is not None and cell.selected else math.nan for cell in row] for row in cells]
        )
        hidden = np.ma.getmaskarray(shares)
        low, high = (float(shares.min()), float(shares.max())) if shares.count() else (1e-4, 1.0)
        axes = figure.add_subplot()
        colours = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
        image = axes.imshow(shares, cmap=colours, norm=LogNorm(low, high if high > low else low * 10), aspect="auto")
        for i, row in enumerate(cells):
            for j, cell in enumerate(row):
                if cell is not None:
                    shade = "#555555" if hidden[i, j] else "black" if image.norm(shares.data[i, j]) > 0.6 else "white"
                    axes.text(j, i, _count(cell.selected), ha="center", va="center", fontsize=7, color=shade)
        axes.set_xticks(range(len(columns)), columns, rotation=40, ha="right", fontsize=8)
        axes.set_yticks(range(len(self.rows)), [row.name for row in self.rows], fontsize=8)
        axes.axvline(len(self.modules) - 0.5, color="white", linewidth=2)
        axes.set_ylabel("layer")
        total = self.total
        axes.set_title(
            f"where the mask's {total.selected:,} entries lie "
            f"({total.share:.3g} of the {total.entries:,} entries it covers)",
            fontsize=10,
        )
        figure.colorbar(image, ax=axes, label="share selected (log scale)")


def mask_placement(patch: Patch) -> MaskPlacement:
    """Where a mask patch's selected entries lie, counted from its mask bits (every tensor its settings' `shapes`
    lists); modules outside the layers are named below the base model of the stacks the patch's base model holds."""
    shapes = covered_shapes(patch)
    base = patch.meta.base
    outside = outside_modules(
        [*shapes, *((t.name for t in base.tensors) if base else ()), *(base.context if base else ())]
    )
    stacks = list(dict.fromkeys(c for name in shapes if (c := layer_container(name)) is not None))
    layers: dict[tuple[str, int], PlacementRow] = {}
    before: dict[str, PlacementRow] = {}
    after: dict[str, PlacementRow] = {}
    modules: dict[str, None] = {}
    for name, shape in shapes.items():
        selected = count_selected(patch.tensors[name + MASK_SUFFIX], shape)
        index, module = layer_index(name), layer_module(name)
        if index is None or module is None:
            outer = outside(name)
            side = before if before_layers(name) else after
            row = side.setdefault(outer, PlacementRow(outer, None))
            module = outer
        else:
            stack = layer_container(name) or ""
            label = str(index) if len(stacks) == 1 else f"{outside(name)}.{index}"
            row = layers.setdefault((stack, index), PlacementRow(label, index))
            modules.setdefault(module, None)
        row.cells.setdefault(module, PlacementCell()).add(selected, prod(shape))
    ordered = sorted(layers.items(), key=lambda item: (stacks.index(item[0][0]), item[0][1]))
    return MaskPlacement(list(modules), [*before.values(), *(row for _, row in ordered), *after.values()])


def _summed(cells: Iterable[PlacementCell]) -> PlacementCell:
    total = PlacementCell()
    for cell in cells:
        total.add(cell.selected, cell.entries)
    return total


def _count(selected: int) -> str:
    """A cell's count, short enough to fit in it."""
    if selected < 10_000:
        return str(selected)
    return f"{selected / 1000:.0f}k" if selected < 1_000_000 else f"{selected / 1e6:.1f}M"
