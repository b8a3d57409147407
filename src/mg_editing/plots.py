"""Figures (matplotlib, Agg backend). Every function is independent and writes one PNG.

Locating figures (paper Figs. 3-7) read the scores a :class:`~mg_editing.locations.Locations`
carries: :func:`plot_layer_locating` (logit-lens he/she curves + per-layer argmax histogram),
:func:`plot_module_importance`, :func:`plot_row_importance`, :func:`plot_neuron_importance`;
:func:`plot_locations` writes whichever of them the locations have scores for.
The report figure, :func:`plot_fb_vs_locality`, sets each evaluated model's generality
FB-Score against its locality (paper Tables V-VII as a picture).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "plot_fb_vs_locality",
    "plot_layer_locating",
    "plot_locations",
    "plot_module_importance",
    "plot_neuron_importance",
    "plot_row_importance",
]


def _np(scores, key: str) -> np.ndarray:
    return scores[key].detach().float().cpu().numpy()


def _title(locations, what: str) -> str:
    model = locations.meta.get("model") or locations.meta.get("model_type") or "model"
    return f"{what} — {Path(str(model)).name}"


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _require(locations, *keys: str) -> None:
    missing = [k for k in keys if k not in locations.scores]
    if missing:
        raise ValueError(f"the locations carry no {', '.join(missing)} scores; locate at a finer granularity first")


def plot_layer_locating(locations, path: str | os.PathLike) -> Path:
    """Figs. 3/4: (A) mean lens p(he), p(she) per layer; (B) how often each layer is the argmax."""
    _require(locations, "lens_p_he", "lens_p_she", "layer_argmax_counts")
    p_he, p_she = _np(locations.scores, "lens_p_he"), _np(locations.scores, "lens_p_she")
    counts = _np(locations.scores, "layer_argmax_counts")
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(p_he))  # 0 = embeddings, i = after block i - 1
    ax_a.plot(x, p_he, marker="o", ms=3, label='p("he")')
    ax_a.plot(x, p_she, marker="s", ms=3, label='p("she")')
    ax_a.set_xlabel("layer (0 = embeddings; i = after block i-1)")
    ax_a.set_ylabel("mean logit-lens probability")
    ax_a.set_title("(A) pronoun probability through the layers")
    ax_a.legend()
    layers = np.arange(len(counts))
    bars = ax_b.bar(layers, counts, color="tab:gray")
    if locations.layer is not None and 0 <= locations.layer < len(counts):
        bars[locations.layer].set_color("tab:red")
    ax_b.set_xlabel("block index")
    ax_b.set_ylabel("prompts for which the block is the most important")
    ax_b.set_title(f"(B) per-prompt argmax (key layer {locations.layer})")
    fig.suptitle(_title(locations, "layer locating"))
    return _save(fig, path)


def plot_module_importance(locations, path: str | os.PathLike) -> Path:
    """Fig. 5: zero-ablation importance of each weight module of the key layer."""
    _require(locations, "module_importance")
    values = _np(locations.scores, "module_importance")
    names = list(locations.meta.get("module_order") or [f"module {i}" for i in range(len(values))])
    prefix = f"{locations.meta.get('layer_name', '')}."
    short = [n[len(prefix):] if prefix != "." and n.startswith(prefix) else n for n in names]
    kept = set(locations.modules)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(values) + 2), 4))
    ax.bar(range(len(values)), values, color=["tab:red" if n in kept else "tab:gray" for n in names])
    ax.set_xticks(range(len(values)), short, rotation=30, ha="right")
    ax.set_ylabel("|Δp(he)| + |Δp(she)|")
    ax.set_title(_title(locations, f"module locating, layer {locations.layer}"))
    return _save(fig, path)


def plot_row_importance(locations, path: str | os.PathLike) -> Path:
    """Fig. 6: mean gradient cosine per output row of the top module; located rows marked."""
    _require(locations, "row_importance")
    values = _np(locations.scores, "row_importance")
    module = locations.meta.get("row_module") or (locations.modules[0] if locations.modules else "")
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(np.arange(len(values)), values, lw=0.8, color="tab:blue")
    rows = locations.rows.get(module)
    if rows is not None and rows.numel():
        idx = rows.cpu().numpy()
        ax.scatter(idx, values[idx], s=10, color="tab:red", zorder=3, label=f"located rows ({len(idx)})")
        ax.legend()
    ax.set_xlabel("row index (output unit)")
    ax.set_ylabel("mean cos(Grad_he[i], Grad_she[i])")
    ax.set_title(_title(locations, f"row locating, {module}"))
    return _save(fig, path)


def plot_neuron_importance(locations, path: str | os.PathLike) -> Path:
    """Fig. 7: mean |g_he - g_she| per column within the top located row."""
    _require(locations, "neuron_importance_top_row")
    values = _np(locations.scores, "neuron_importance_top_row")
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(np.arange(len(values)), values, lw=0.8, color="tab:purple")
    top = int(np.argmax(values))
    ax.scatter([top], [values[top]], color="tab:red", zorder=3, label=f"max at column {top}")
    ax.legend()
    ax.set_xlabel("column index (input unit)")
    ax.set_ylabel("mean |g_he(i, j) - g_she(i, j)|")
    module = locations.meta.get("row_module", "")
    ax.set_title(_title(locations, f"neuron locating, row {locations.meta.get('top_row')} of {module}"))
    return _save(fig, path)


_LOCATING_PLOTS = (
    ("layer_locating.png", ("lens_p_he", "lens_p_she", "layer_argmax_counts"), plot_layer_locating),
    ("module_importance.png", ("module_importance",), plot_module_importance),
    ("row_importance.png", ("row_importance",), plot_row_importance),
    ("neuron_importance.png", ("neuron_importance_top_row",), plot_neuron_importance),
)


def plot_locations(locations, out_dir: str | os.PathLike) -> list[Path]:
    """Write every locating figure the locations have scores for; returns the PNG paths."""
    out_dir = Path(out_dir)
    written = []
    for filename, keys, plot in _LOCATING_PLOTS:
        if all(k in locations.scores for k in keys):
            written.append(plot(locations, out_dir / filename))
    return written


def plot_fb_vs_locality(entries, path: str | os.PathLike) -> Path:
    """Generality FB-Score (x, lower is better) against locality (y) for every evaluated model.

    Locality is HumanEval pass@1 when the report has it and it tells the models apart,
    otherwise the held-out NLL (lower is better; the axis says which). ``entries`` are report
    entries (:mod:`mg_editing.report`).
    """
    if not entries:
        raise ValueError("no entries to plot")
    passes = [e.get("locality", {}).get("pass@1") for e in entries]
    have_pass = None not in passes and len(set(passes)) > 1
    key, label = ("pass@1", "HumanEval pass@1 (↑)") if have_pass else ("canonical_nll", "held-out solution NLL (↓)")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for e in entries:
        x, y = e.get("generality_fb"), e.get("locality", {}).get(key)
        if x is None or y is None:
            continue
        base = e.get("granularity") is None
        ax.scatter([x], [y], s=70, marker="*" if base else "o", color="black" if base else None, zorder=3)
        ax.annotate(e.get("granularity") or e["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xlabel("generality FB-Score on CodeGenBias test (↓)")
    ax.set_ylabel(label)
    ax.set_title("Bias removed vs code ability kept")
    ax.grid(alpha=0.3)
    return _save(fig, path)
