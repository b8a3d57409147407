"""Sharing an MG-Edit adapter: a generated model card and the push to the Hub.

Example:
    >>> card = adapter_model_card(base_model="Salesforce/codegen-350M-mono", granularity="row",
    ...                           locations_summary={"modules": ["transformer.h.19.mlp.fc_out"], "rows": 118},
    ...                           metrics={"before": {"reliability_fb": 0.98}, "after": {"reliability_fb": 0.21}})
    >>> "PeftModel.from_pretrained" in card and "mg-editing" in card
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["adapter_model_card", "push_adapter", "save_adapter"]

_METRIC_LABELS = {
    "reliability_fb": "Reliability FB-Score (train, ↓)",
    "generality_fb": "Generality FB-Score (test, ↓)",
    "pass@1": "HumanEval pass@1 (held-out, ↑)",
    "pass@10": "HumanEval pass@10 (held-out, ↑)",
    "greedy_pass@1": "HumanEval greedy pass@1 (↑)",
    "canonical_nll": "NLL of held-out solutions (↓)",
    "next_token_kl": "KL to the base model on code (↓)",
}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("–" if value is None else str(value))


def adapter_model_card(
    *,
    base_model: str,
    granularity: str,
    locations_summary: dict[str, Any],
    metrics: dict[str, dict[str, Any]] | None = None,
    objective: str | None = None,
    repo_id: str | None = None,
) -> str:
    """The README.md of an adapter repo: what was edited, how well, and how to load it."""
    metrics = metrics or {}
    before, after = metrics.get("before", {}), metrics.get("after", {})
    keys = [k for k in _METRIC_LABELS if k in before or k in after]
    rows = "\n".join(f"| {_METRIC_LABELS[k]} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |" for k in keys)
    table = f"| metric | base | edited |\n|---|---|---|\n{rows}" if keys else "_No evaluation recorded._"
    where = "\n".join(f"- **{k}**: {v}" for k, v in locations_summary.items())
    name = repo_id or "path/to/this/adapter"
    return f"""---
base_model: {base_model}
library_name: peft
tags:
- peft
- mg-editing
- debiasing
- gender-bias
- code
---

# MG-Edit adapter ({granularity} granularity) for `{base_model}`

A debiasing edit made with [mg-editing](https://github.com/mg-editing/mg-editing): the
parameters located as responsible for gender bias on CodeGenBias were fine-tuned
(objective: `{objective or 'n/a'}`), nothing else. The aim is FB-Score alignment: p("he") and
p("she") after a profession prompt should match the profession's real-world gender share.

## What was edited

- **granularity**: {granularity}
{where}

## Results

{table}

## How to load

```python
import mg_editing  # registers the MG_EDIT adapter type with PEFT
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base_model}")
model = PeftModel.from_pretrained(base, "{name}")
merged = model.merge_and_unload()   # a plain transformers model with the edit folded in
```

## Limits

Binary gender only, as the CodeGenBias data; the real-world shares are Bolukbasi et al.'s
(2016) definitional scores. Check locality on your own tasks before deploying.
"""


def save_adapter(peft_model, out_dir: str | os.PathLike, *, card: str | None = None, extra: dict | None = None) -> Path:
    """``save_pretrained`` plus our model card (replacing PEFT's generic one) and metadata."""
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    if card is not None:
        (out / "README.md").write_text(card)
    if extra is not None:
        (out / "mg_editing.json").write_text(json.dumps(extra, indent=1) + "\n")
    return out


def push_adapter(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload a saved adapter folder (adapter_config.json, adapter_model.safetensors, README.md)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no adapter_config.json; save the adapter first")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload MG-Edit adapter")
    return str(getattr(info, "commit_url", repo_id))
