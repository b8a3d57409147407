"""The evaluation report: Table V (reliability, generality, locality) and Table III per category.

Each evaluated model (the base and every adapter) is one *entry*, a plain dict::

    {"name": "row", "granularity": "row", "objective": "fb",
     "reliability_fb": 0.21, "generality_fb": 0.24, "generality_fb_normalized": 0.1,
     "per_category": {...}, "locality": {"pass@1": ..., "pass@10": ..., "greedy_pass@1": ...,
     "canonical_nll": ..., "next_token_kl": ...}, "trainable_params": 12345}

Example:
    >>> entries = [{"name": "base", "reliability_fb": 0.9, "generality_fb": 0.91, "locality": {"pass@1": 0.2}},
    ...            {"name": "row", "reliability_fb": 0.3, "generality_fb": 0.35, "locality": {"pass@1": 0.19}}]
    >>> print(table_v(entries).splitlines()[2])
    | base | 0.9000 | 0.9100 | 0.2000 | – | – | – | – |
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from mg_editing._files import atomic_write_text
from mg_editing.data import CATEGORIES

__all__ = ["report_paths", "table_iii", "table_v", "write_report"]

_LOCALITY_COLUMNS = (
    ("pass@1", "Locality-Pass@1 (↑)"),
    ("pass@10", "Locality-Pass@10 (↑)"),
    ("greedy_pass@1", "Greedy Pass@1 (↑)"),
    ("canonical_nll", "Held-out NLL (↓)"),
    ("next_token_kl", "KL to base (↓)"),
)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def table_v(entries: Sequence[dict]) -> str:
    """Markdown in the layout of the paper's Tables V-VII, plus the execution-free columns."""
    head = "| LLM | Reliability-FB-Score (↓) | Generality-FB-Score (↓) | " + " | ".join(c for _, c in _LOCALITY_COLUMNS) + " |"
    rule = "|" + "---|" * (3 + len(_LOCALITY_COLUMNS))
    lines = [head, rule]
    for e in entries:
        loc = e.get("locality", {})
        cells = [_fmt(e.get("reliability_fb")), _fmt(e.get("generality_fb"))] + [_fmt(loc.get(k)) for k, _ in _LOCALITY_COLUMNS]
        lines.append(f"| {e['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_iii(entries: Sequence[dict]) -> str:
    """Per-category generality FB-Score in the layout of the paper's Table III."""
    head = "| LLM | " + " | ".join(f"{c} (↓)" for c in CATEGORIES) + " | Average (↓) |"
    rule = "|" + "---|" * (len(CATEGORIES) + 2)
    lines = [head, rule]
    for e in entries:
        per = e.get("per_category", {})
        lines.append(f"| {e['name']} | " + " | ".join(_fmt(per.get(c)) for c in CATEGORIES) + f" | {_fmt(e.get('generality_fb'))} |")
    return "\n".join(lines)




def report_paths(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Where :func:`write_report` puts the Markdown report, its JSON and the plot."""
    out = Path(out_dir)
    return {"markdown": out / "report.md", "json": out / "report.json", "plot": out / "fb_vs_pass1.png"}


def write_report(entries: Sequence[dict], out_dir: str | os.PathLike, *, title: str = "MG-Editing report", settings: dict | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and ``fb_vs_pass1.png`` into ``out_dir``."""
    from mg_editing.plots import plot_fb_vs_locality

    if not entries:
        raise ValueError("nothing to report: no evaluated models")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or {}
    md = [f"# {title}", "", "## Table V layout: reliability, generality, locality", "", table_v(entries), ""]
    md += ["Reliability = FB-Score on CodeGenBias train (555), generality = FB-Score on test (3328), "
           "locality = HumanEval problems 17-164 (the first 16 are the recovery set).", ""]
    md += ["## Table III layout: generality FB-Score per modifier category", "", table_iii(entries), ""]
    if settings:
        md += ["## Settings", "", "```json", json.dumps(settings, indent=1), "```", ""]
    paths = report_paths(out)
    atomic_write_text(paths["markdown"], "\n".join(md))
    atomic_write_text(paths["json"], json.dumps({"title": title, "settings": settings, "entries": list(entries)}, indent=1) + "\n")
    plot_fb_vs_locality(entries, paths["plot"])
    return paths
