"""PNG plots for run folders: softmaxed alphas per edge over epochs, collapse diagnostics, and derived cells.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot), so plotting never touches
the user's interactive backend and works headless.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .runs import atomic_save_figure
from .spaces import CellSpace


def plot_alpha_history(history: list[dict[str, list]], space: CellSpace, path: "str | Path") -> Path:
    """One panel per (cell type, edge): each candidate's softmax weight against the epoch."""
    if not history:
        raise ValueError("the alpha history is empty; expected at least the initial alphas")
    path = Path(path)
    cols = min(space.num_edges, 7)
    rows_per_type = math.ceil(space.num_edges / cols)
    n_rows = rows_per_type * len(space.cell_types)
    fig = Figure(figsize=(2.3 * cols, 1.9 * n_rows + 0.8), layout="constrained")
    axes = fig.subplots(n_rows, cols, squeeze=False, sharex=True, sharey=True)
    epochs = list(range(len(history)))
    lines = []
    for t, ct in enumerate(space.cell_types):
        for e, (node, src) in enumerate(space.edges):
            ax = axes[t * rows_per_type + e // cols][e % cols]
            lines = [ax.plot(epochs, [h[ct][e][k] for h in history], lw=1.2)[0] for k in range(len(space.ops))]
            ax.set_title(f"{ct}: {src}->{node}", fontsize=8)
            ax.tick_params(labelsize=7)
        for e in range(space.num_edges, rows_per_type * cols):
            axes[t * rows_per_type + e // cols][e % cols].set_visible(False)
    fig.supxlabel("epoch")
    fig.supylabel("softmax(alpha)")
    fig.legend(lines, list(space.ops), loc="outside upper center", ncol=len(space.ops), fontsize=8)
    return atomic_save_figure(fig, path, dpi=90)


COLLAPSE_PANELS = (("parameter_free_share", "parameter-free share\nof the derived cells"),
                   ("alpha_entropy", "mean alpha entropy\nper edge (nats)"),
                   ("hessian_eigenvalue", "dominant eigenvalue\nof the alpha Hessian"))


def plot_collapse(records: list[dict], path: "str | Path") -> Path:
    """Collapse diagnostics against the epoch, one panel per diagnostic the epoch records hold."""
    panels = [(key, label) for key, label in COLLAPSE_PANELS if any(key in r for r in records)]
    if not panels:
        raise ValueError("the epoch records hold no collapse diagnostics")
    path = Path(path)
    fig = Figure(figsize=(3.4 * len(panels), 2.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label) in zip(axes, panels, strict=True):
        points = [(r["epoch"], r[key]) for r in records if key in r]
        ax.plot([e for e, _ in points], [v for _, v in points], marker="o", lw=1.2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    return atomic_save_figure(fig, path, dpi=90)


def plot_cell(genotype: Any, space: CellSpace, cell_type: str, path: "str | Path") -> Path:
    """The cell of `genotype` as a DAG: inputs on the left, the output on the right, ops on the edges."""
    if cell_type not in space.cell_types:
        raise ValueError(f"unknown cell type {cell_type!r}; expected one of {list(space.cell_types)}")
    path = Path(path)
    chosen = space.to_paths(genotype)[cell_type]
    names = space.node_labels
    n_in, n_mid = space.num_input_nodes, space.num_nodes
    pos = {}
    for i in range(n_in):
        pos[i] = (0.0, 1.0 - 2.0 * i) if n_in > 1 else (0.0, 0.0)
    for j in range(n_mid):  # intermediate nodes left to right on a zig-zag, so edges rarely cross labels
        pos[n_in + j] = (2.0 + 2.0 * j, 1.8 * (-1) ** j)
    out_x = 2.0 + 2.0 * n_mid
    fig = Figure(figsize=(2.5 + 2.2 * n_mid, 4.2), layout="constrained")
    ax = fig.subplots()
    none = space.ops.index("none") if "none" in space.ops else None
    for e, (node, src) in enumerate(space.edges):
        k = chosen[e]
        if k is None or k == none:
            continue
        (x0, y0), (x1, y1) = pos[src], pos[node]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops={"arrowstyle": "-|>", "color": "0.35", "shrinkA": 15, "shrinkB": 15})
        t = 0.6  # label nearer the destination: edges leaving one node would otherwise share a spot
        ax.text(x0 + t * (x1 - x0), y0 + t * (y1 - y0), space.ops[k], fontsize=7, ha="center", va="center",
                rotation=math.degrees(math.atan2((y1 - y0) * 0.6, x1 - x0)), rotation_mode="anchor",
                bbox={"boxstyle": "round,pad=0.15", "fc": "lightyellow", "ec": "0.7"})
    if len(space.output_nodes) > 1:  # the cell concatenates several nodes (DARTS): draw its output node
        pos["out"] = (out_x, 0.0)
        for j in space.output_nodes:
            ax.annotate("", xy=pos["out"], xytext=pos[j],
                        arrowprops={"arrowstyle": "-|>", "color": "0.75", "shrinkA": 14, "shrinkB": 14})
        names_out = {"out": "c_{k}"}
    else:
        names_out = {}
    for node, (x, y) in pos.items():
        label = names_out.get(node, names[node] if isinstance(node, int) else node)
        color = "lightskyblue" if node == "out" or (isinstance(node, int) and node < n_in) else "lightgray"
        ax.text(x, y, label, fontsize=9, ha="center", va="center",
                bbox={"boxstyle": "circle,pad=0.3", "fc": color, "ec": "0.3"})
    ax.set_xlim(-0.6, out_x + 0.6)
    ax.set_ylim(-2.4, 2.4)
    ax.set_axis_off()
    ax.set_title(cell_type if cell_type == "cell" else f"{cell_type} cell", fontsize=10)
    return atomic_save_figure(fig, path, dpi=100)
