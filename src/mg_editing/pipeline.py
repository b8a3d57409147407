"""The whole MG-Editing pipeline: score, locate, edit each granularity, evaluate, report.

Every stage writes its result atomically under ``out_dir`` as soon as it is produced; a rerun
with the same ``out_dir`` skips finished stages, so an interrupted run resumes. An edit that
was interrupted restarts from the base model with the same seed, so the resumed report
equals an uninterrupted one.

Layout of ``out_dir``::

    stages/base.json               base model evaluation
    locations/                     Locations (json + safetensors) and the locating plots
    adapters/<granularity>/        PEFT adapter, model card, edit history, evaluation
    report.md, report.json, fb_vs_pass1.png

Example (small, no code execution)::

    from mg_editing.pipeline import RunSettings, run_pipeline
    run_pipeline("demo", "runs/demo", RunSettings(granularities=("row",), humaneval_limit=8))
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from mg_editing._files import atomic_write_json
from mg_editing.distributed import is_main_process, wait_for_everyone
from mg_editing.edit import EditConfig, edit
from mg_editing.locations import GRANULARITIES, Locations, check_granularity

__all__ = ["RunSettings", "evaluate_model", "run_pipeline"]


@dataclass
class RunSettings:
    """Everything that decides a run's numbers; recorded in the report."""

    granularities: Sequence[str] = GRANULARITIES
    edit: EditConfig = field(default_factory=EditConfig)
    locate_split: str = "train+dev"
    locate_options: dict[str, Any] = field(default_factory=dict)
    score_batch_size: int = 32
    #: score only every n-th prompt of train/test for a quick look (1: all, as in the paper)
    score_stride: int = 1
    #: HumanEval sampling; pass@k needs the code-execution opt-in.
    n_samples: int = 10
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 128
    generation_batch_size: int = 16
    #: evaluate only the first N held-out problems (None: all 148)
    humaneval_limit: int | None = None
    allow_code_execution: bool = False
    #: unrelated code prompts for the KL locality number (first N held-out HumanEval prompts)
    kl_prompts: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        self.granularities = tuple(check_granularity(g) for g in self.granularities)
        if not self.granularities:
            raise ValueError("no granularities to run")
        if isinstance(self.edit, dict):
            self.edit = EditConfig(**self.edit)
        if self.score_stride < 1:
            raise ValueError(f"score_stride must be at least 1, got {self.score_stride}")

    def to_dict(self) -> dict:
        return asdict(self)


# -- small helpers ----------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None




def _write_json(path: Path, payload: dict) -> None:
    """Process 0 writes (atomically); every process waits until the file is there."""
    if is_main_process():
        atomic_write_json(path, payload)
    wait_for_everyone()


def _log(message: str) -> None:
    print(f"[mg-edit] {message}", flush=True)


# -- evaluation -------------------------------------------------------------------------------
def evaluate_model(model, tokenizer, settings: RunSettings, *, name: str, adapter: bool = False, progress: bool = True) -> dict:
    """Reliability (train FB), generality (test FB), per-category FB and locality of one model.

    With ``adapter=True`` the model is a PeftModel and the KL is taken against its base
    (adapter disabled).
    """
    from mg_editing.data import load_codegenbias
    from mg_editing.locality import canonical_nll, evaluate_humaneval, humaneval_problems, next_token_kl
    from mg_editing.scoring import score_dataset

    def split(name: str):
        rows = load_codegenbias(name)
        return rows if settings.score_stride == 1 else rows.select(range(0, len(rows), settings.score_stride))

    train = score_dataset(model, tokenizer, split("train"), batch_size=settings.score_batch_size, progress=progress)
    test = score_dataset(model, tokenizer, split("test"), batch_size=settings.score_batch_size, progress=progress)
    problems = humaneval_problems("heldout")
    if settings.humaneval_limit is not None:
        problems = problems[: settings.humaneval_limit]
    locality: dict[str, Any] = {"canonical_nll": canonical_nll(model, tokenizer, problems, progress=progress)}
    if adapter:
        kl_prompts = [p["prompt"] for p in problems[: settings.kl_prompts]]
        locality["next_token_kl"] = next_token_kl(model, None, tokenizer, kl_prompts, progress=progress)
    else:
        locality["next_token_kl"] = 0.0
    if settings.allow_code_execution:
        he = evaluate_humaneval(
            model, tokenizer, problems=problems, n_samples=settings.n_samples, temperature=settings.temperature,
            top_p=settings.top_p, max_new_tokens=settings.max_new_tokens, batch_size=settings.generation_batch_size,
            seed=settings.seed, greedy=True, allow_code_execution=True, progress=progress,
        )
        locality.update({k: v for k, v in he.items() if k.startswith(("pass@", "greedy_pass@"))})
        locality["humaneval_settings"] = he["settings"]
    return {
        "name": name,
        "reliability_fb": train.fb_score,
        "reliability_fb_normalized": train.metrics["fb_score_normalized"],
        "generality_fb": test.fb_score,
        "generality_fb_normalized": test.metrics["fb_score_normalized"],
        "per_category": test.metrics["per_category"],
        "mean_p_he_test": float(test.p_he.mean()),
        "mean_p_she_test": float(test.p_she.mean()),
        "locality": locality,
    }


# -- stages -----------------------------------------------------------------------------------
def _locate_stage(model, tokenizer, settings: RunSettings, out: Path, progress: bool) -> Locations:
    from mg_editing.data import load_codegenbias
    from mg_editing.locate import locate
    from mg_editing.plots import plot_locations

    folder = out / "locations"
    if (folder / "locations.json").is_file():
        _log(f"locations: reusing {folder}")
        return Locations.load(folder)
    finest = max(settings.granularities, key=GRANULARITIES.index)
    _log(f"locating at {finest} granularity on CodeGenBias {settings.locate_split}")
    locations = locate(model, tokenizer, load_codegenbias(settings.locate_split), finest, progress=progress, **settings.locate_options)
    if is_main_process():
        tmp = out / "locations.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        locations.save(tmp)
        plot_locations(locations, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
        _log(f"located: {locations!r}")
    wait_for_everyone()
    return locations


def _edit_stage(base_model, tokenizer, locations: Locations, granularity: str, settings: RunSettings, out: Path, base_entry: dict, progress: bool) -> dict:
    from peft import get_peft_model

    from mg_editing.data import load_codegenbias
    from mg_editing.hub import adapter_model_card, save_adapter
    from mg_editing.tuner import MGEditConfig

    folder = out / "adapters" / granularity
    done = _read_json(folder / "evaluation.json")
    if done is not None:
        _log(f"{granularity}: reusing {folder}")
        return done
    _log(f"{granularity}: editing ({settings.edit.objective} objective)")
    # The base stays untouched for the next granularity: a copy is edited, except for a model
    # that accelerate dispatched over devices (device_map), which a copy could not fit beside;
    # that one gets the adapter in place, and it is taken out again afterwards (an edit writes
    # no base weight, so the base is as it was).
    in_place = getattr(base_model, "hf_device_map", None) is not None
    model = base_model if in_place else copy.deepcopy(base_model)
    locs = locations.coarsen(granularity)
    peft_model = get_peft_model(model, MGEditConfig(granularity=granularity, locations=locs))
    try:
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        tmp = out / "adapters" / f"{granularity}.tmp"
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        wait_for_everyone()
        result = edit(
            peft_model, tokenizer, load_codegenbias("train"), dev_dataset=load_codegenbias("dev"),
            config=settings.edit, history_path=tmp / "edit_history.json", progress=progress,
        )
        entry = evaluate_model(peft_model, tokenizer, settings, name=f"{granularity} granularity", adapter=True, progress=progress)
        entry.update(granularity=granularity, objective=settings.edit.objective, trainable_params=trainable,
                     best_step=result.best_step, best_dev_fb=result.best_dev_fb)
        summary = {**locs.summary(), "trainable parameters": trainable}
        keys = ("reliability_fb", "generality_fb")
        metrics = {
            "before": {**{k: base_entry[k] for k in keys}, **base_entry["locality"]},
            "after": {**{k: entry[k] for k in keys}, **entry["locality"]},
        }
        card = adapter_model_card(
            base_model=str(base_model.name_or_path), granularity=granularity, locations_summary=summary,
            metrics=metrics, objective=settings.edit.objective,
        )
        if is_main_process():
            save_adapter(peft_model, tmp, card=card, extra={"granularity": granularity, "objective": settings.edit.objective})
            atomic_write_json(tmp / "evaluation.json", entry)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.replace(folder)
            _log(f"{granularity}: train FB {entry['reliability_fb']:.4f}, test FB {entry['generality_fb']:.4f}")
        wait_for_everyone()
        return entry
    finally:
        if in_place:
            peft_model.unload()


def run_pipeline(
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: RunSettings | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    progress: bool = True,
    **model_kwargs,
) -> dict[str, Path]:
    """Run (or resume) the pipeline for ``model`` (Hub id, path or ``"demo"``) into ``out_dir``.

    ``dtype``, ``device``, ``device_map`` and ``model_kwargs`` (``max_memory``,
    ``offload_folder``...) go to :func:`mg_editing.models.load_model_and_tokenizer`. Under
    ``accelerate launch`` / ``torchrun`` every process runs every stage on its share of the
    prompts (:mod:`mg_editing.distributed`); process 0 writes the files.
    """
    from mg_editing.models import load_model_and_tokenizer
    from mg_editing.report import report_paths, write_report

    settings = settings or RunSettings()
    out = Path(out_dir)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    wait_for_everyone()
    recorded = _read_json(out / "settings.json")
    current = {"model": str(model), **settings.to_dict()}
    current = json.loads(json.dumps(current))
    if recorded is not None and recorded != current:
        raise ValueError(
            f"{out} holds a run with other settings; use a new --out or delete it. "
            f"Differences: {sorted(k for k in current if recorded.get(k) != current.get(k))}"
        )
    wait_for_everyone()  # every process has read (and compared) the recorded settings
    _write_json(out / "settings.json", current)
    torch.manual_seed(settings.seed)
    base_model, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=device, device_map=device_map, **model_kwargs)

    base_entry = _read_json(out / "stages" / "base.json")
    if base_entry is None:
        _log("evaluating the base model")
        base_entry = evaluate_model(base_model, tokenizer, settings, name="original model", progress=progress)
        _write_json(out / "stages" / "base.json", base_entry)
    else:
        _log("base model: reusing stages/base.json")
    entries = [base_entry]
    needs_locating = any(g != "full" for g in settings.granularities)
    locations = _locate_stage(base_model, tokenizer, settings, out, progress) if needs_locating else Locations("full")
    for granularity in settings.granularities:
        entries.append(_edit_stage(base_model, tokenizer, locations, granularity, settings, out, base_entry, progress))
    if is_main_process():
        paths = write_report(entries, out, title=f"MG-Editing report: {model}", settings=current)
        _log(f"report: {paths['markdown']}")
    wait_for_everyone()
    return report_paths(out)
