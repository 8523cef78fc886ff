"""Figures of a run, drawn with matplotlib's object API (no pyplot: no global figure state, no GUI backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

STAGE_COLORS = {"sft": "tab:blue", "dpo": "tab:orange"}


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1, **kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False, **kwargs)
    return figure, axes


def save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _grid_labels(ax, layers: int, experts: int, row_labels: Sequence[str] | None = None) -> None:
    ax.set_xticks(range(experts), [str(e) for e in range(experts)])
    step = -(-layers // 32)  # every layer of a 32-layer Mixtral: each drift row carries its own top-k agreement
    ax.set_yticks(range(0, layers, step), row_labels[::step] if row_labels else [str(i) for i in range(0, layers, step)])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")


def _annotate(ax, values: np.ndarray, fmt: str, dark) -> None:
    """Write each cell's value, white on dark cells; `dark(v)` says which are dark."""
    if values.size > 256:  # unreadable on a 32-layer model; the colour says enough
        return
    for (i, j), v in np.ndenumerate(values):
        text = format(v, fmt)
        if float(text) == 0:  # not "-0.0" for a change that rounds to nothing
            text = format(0.0, fmt)
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark(v) else "black")


def _heatmap_size(layers: int, experts: int, extra_width: float = 0.0) -> tuple[float, float]:
    return 2.2 + extra_width + 0.6 * experts, max(3.0, 1.6 + 0.3 * layers)


def load_heatmap(load: np.ndarray, title: str, path: Path) -> Path:
    """Layers x experts: the share of each layer's routed tokens that each expert received, in percent."""
    layers, experts = load.shape
    figure, axes = new_figure(*_heatmap_size(layers, experts))
    ax = axes[0, 0]
    top = max(float(load.max()), 2.0 / experts) * 100
    image = ax.imshow(load * 100, cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
    _grid_labels(ax, layers, experts)
    _annotate(ax, load * 100, ".0f", dark=lambda v: v < 0.6 * top)
    ax.set_title(f"{title}\n% of each layer's routed tokens (uniform: {100 / experts:.1f}%)", fontsize=9)
    figure.colorbar(image, ax=ax, label="% of routed tokens")
    return save(figure, path)


def drift_heatmap(delta: np.ndarray, agreement: np.ndarray, title: str, path: Path) -> Path:
    """Layers x experts: fine-tuned minus base expert load (percentage points), each layer labelled with the
    share of its top-k choices that did not change."""
    layers, experts = delta.shape
    figure, axes = new_figure(*_heatmap_size(layers, experts, extra_width=1.0))
    ax = axes[0, 0]
    limit = max(float(np.abs(delta).max()) * 100, 0.1)
    image = ax.imshow(delta * 100, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    _grid_labels(ax, layers, experts, [f"{i} (top-k same {a:.0%})" for i, a in enumerate(agreement)])
    _annotate(ax, delta * 100, "+.1f", dark=lambda v: abs(v) > 0.6 * limit)
    ax.set_title(f"{title}\nfine-tuned minus base, percentage points of routed tokens", fontsize=9)
    figure.colorbar(image, ax=ax, label="change (points)")
    return save(figure, path)


def png_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))
