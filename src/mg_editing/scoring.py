"""Pronoun probabilities and the FB-Score (paper Eqs. 6-8, DESIGN.md decision 4).

``p(x)`` is the model's probability of the continuation ``x`` right after the prompt. When the
tokenizer splits ``x`` into several tokens the chain rule is used over all of them. When the
tokenizer merges the end of the prompt with the start of ``x`` (e.g. ``'`` + ``he`` ->
``'he``), the prompt/continuation boundary is not a token boundary; then the full text
``prompt + x`` is scored from where its tokenization leaves the prompt's:
``p(x | prompt) ~= p(tokens of tail + x | head)``, with ``head`` the longest token prefix that
``prompt`` and ``prompt + x`` share. This stays a probability (the two pronouns' values sum to
at most 1); it slightly underestimates both pronouns by the same tail, so the normalized
variant is unaffected (docs/decisions.md).

The fast scorer runs the token prefix shared by every prompt once (the two CodeGenBias
demonstrations), reuses its KV cache for every batch, and batches the prompt suffixes with
right padding (causal attention never looks at the pads, whatever the tokenizer's own
padding side or pad token).

Example:
    >>> import sys; sys.path.insert(0, "tests")
    >>> from conftest import make_model, make_tokenizer
    >>> from mg_editing.data import load_codegenbias
    >>> tok = make_tokenizer(); model = make_model("codegen", len(tok))
    >>> rows = load_codegenbias("dev").select(range(8))
    >>> probs = pronoun_probabilities(model, tok, rows["prompt"])
    >>> tuple(probs.shape)
    (8, 2)
    >>> result = fb_score(probs[:, 0], probs[:, 1], rows["fscore"], rows["category"])
    >>> 0.0 <= result["fb_score"] <= 2.0
    True
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from mg_editing.data import CATEGORIES
from mg_editing.distributed import gather_tensor, local_part

__all__ = [
    "PRONOUNS",
    "PronounTarget",
    "check_vocabulary",
    "encode_targets",
    "fb_score",
    "pronoun_log_probs",
    "pronoun_probabilities",
    "pronoun_probabilities_naive",
    "score_dataset",
]

PRONOUNS: tuple[str, str] = ("he", "she")


@dataclass(frozen=True)
class PronounTarget:
    """How to read ``log p(pronoun | prompt)`` off a causal LM: ``log p(target | context)``.

    ``merged`` is True when the tokenizer merged the prompt's end into the pronoun, so
    ``context`` is shorter than the prompt's own tokenization (see the module docstring).
    """

    context: tuple[int, ...]
    target: tuple[int, ...]
    merged: bool = False


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_targets(tokenizer, prompts: Sequence[str], pronouns: Sequence[str] = PRONOUNS) -> list[tuple[PronounTarget, ...]]:
    """Tokenize every prompt and continuation, detecting boundary merges.

    Returns one tuple of :class:`PronounTarget` (one per pronoun) per prompt.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to score: the prompt list is empty")
    if not pronouns:
        raise ValueError("no pronouns given")
    out = []
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"every prompt must be a non-empty string, got {prompt!r}")
        base = _encode(tokenizer, prompt)
        targets = []
        for x in pronouns:
            full = _encode(tokenizer, prompt + x)
            n = _common_prefix_length(base, full)
            if n == 0:
                raise ValueError(f"the tokenizer shares no token between {prompt[-20:]!r} and the same text + {x!r}")
            if len(full) == n:
                raise ValueError(f"the tokenizer cannot express {x!r} after the prompt (it adds no token)")
            targets.append(PronounTarget(tuple(full[:n]), tuple(full[n:]), merged=n < len(base)))
        out.append(tuple(targets))
    return out


def check_vocabulary(model: nn.Module, tokenizer, pronouns: Sequence[str] = PRONOUNS) -> None:
    """Fail clearly when the tokenizer and the model disagree or cannot express the pronouns."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None:
        raise TypeError(
            f"{type(model).__name__} has no language-model head; load a causal LM "
            "(AutoModelForCausalLM), not a base or classification model"
        )
    model_vocab = emb.weight.shape[0] if hasattr(emb, "weight") else model.config.vocab_size
    max_id = max(int(i) for i in tokenizer.get_vocab().values())
    if max_id >= model_vocab:
        raise ValueError(
            f"tokenizer/model vocabulary mismatch: the tokenizer has token id {max_id} but the model's "
            f"output layer has {model_vocab} rows; load the tokenizer that belongs to this model"
        )
    for x in pronouns:
        ids = tokenizer(x, add_special_tokens=False)["input_ids"]
        if not ids or tokenizer.decode(ids).strip() != x:
            raise ValueError(f"the tokenizer cannot express the pronoun {x!r} (it encodes to {ids})")


# -- the core: batched log-probabilities of continuations -------------------------------------
def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5.x renamed `past_key_values` to `cache`. A PeftModel passes keyword
    # arguments through to the model it wraps, whose signature is the one that counts.
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(outputs):
    cache = outputs.get("cache", None)
    return cache if cache is not None else outputs.get("past_key_values", None)


def _check_length(model: nn.Module, targets: Sequence[tuple[PronounTarget, ...]]) -> None:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = max(len(t.context) + len(t.target) for per_prompt in targets for t in per_prompt)
    if isinstance(limit, int) and longest > limit:
        raise ValueError(f"a prompt is {longest} tokens long, beyond the model's {limit} positions")


def model_device(model: nn.Module) -> torch.device:
    """Where the model's (first) parameters live; inputs are sent there."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _continuation_log_probs(
    model: nn.Module,
    pairs: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
    *,
    prefix_cache=None,
    prefix_length: int = 0,
) -> torch.Tensor:
    """``log p(continuation | context)`` for each pair, in one padded forward.

    ``pairs`` share their first ``prefix_length`` tokens, whose KV cache is ``prefix_cache``
    (or nothing). Differentiable when called with grad enabled. Pairs with the same forward
    sequence (e.g. "he" and "she" after one prompt) share a batch row.
    """
    device = model_device(model)
    rows: dict[tuple[int, ...], int] = {}
    plan = []
    for context, cont in pairs:
        if not cont:
            plan.append(None)
            continue
        seq = tuple(context) + tuple(cont[:-1])
        row = rows.setdefault(seq, len(rows))
        plan.append((row, len(context), cont))
    out = torch.zeros(len(pairs), dtype=torch.float32, device=device)
    if not rows:
        return out
    seqs = list(rows)
    suffixes = [s[prefix_length:] for s in seqs]
    width = max(len(s) for s in suffixes)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), prefix_length + width, dtype=torch.long)
    mask[:, :prefix_length] = 1
    for i, s in enumerate(suffixes):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, prefix_length : prefix_length + len(s)] = 1
    kwargs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "use_cache": prefix_cache is not None}
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(seqs))
        kwargs[_cache_kwarg(model)] = cache
        kwargs["position_ids"] = (prefix_length + torch.arange(width)).expand(len(seqs), -1).to(device)
    logits = model(**kwargs).logits
    device = logits.device  # with a device_map the output may live on another device than the inputs
    out = out.to(device)
    # Only the positions that predict continuation tokens go through log_softmax.
    index_rows, index_pos, index_tok, owner = [], [], [], []
    for k, item in enumerate(plan):
        if item is None:
            continue
        row, context_len, cont = item
        for j, tok in enumerate(cont):
            index_rows.append(row)
            index_pos.append(context_len - 1 + j - prefix_length)
            index_tok.append(tok)
            owner.append(k)
    picked = logits[torch.tensor(index_rows, device=device), torch.tensor(index_pos, device=device)].float()
    token_lp = torch.log_softmax(picked, dim=-1).gather(1, torch.tensor(index_tok, device=device)[:, None])[:, 0]
    return out.index_add(0, torch.tensor(owner, device=device), token_lp)


def _target_pairs(targets: Sequence[tuple[PronounTarget, ...]]):
    return [(t.context, t.target) for per_prompt in targets for t in per_prompt]


def _combine(pair_lp: torch.Tensor, n_prompts: int, n_pronouns: int) -> torch.Tensor:
    return pair_lp.view(n_prompts, n_pronouns)


def pronoun_log_probs(model: nn.Module, targets: Sequence[tuple[PronounTarget, ...]]) -> torch.Tensor:
    """Differentiable ``log p(pronoun | prompt)``, shape ``(len(targets), n_pronouns)``.

    One forward per batch, shared by all pronouns of a prompt. Used by locating and editing,
    where gradients are needed; for evaluation use :func:`pronoun_probabilities`.
    """
    if not targets:
        raise ValueError("no prompts given")
    return _combine(_continuation_log_probs(model, _target_pairs(targets)), len(targets), len(targets[0]))


def _shared_prefix_length(targets: Sequence[tuple[PronounTarget, ...]]) -> int:
    first = targets[0][0].context
    n = len(first)
    for per_prompt in targets:
        for t in per_prompt:
            n = min(n, _common_prefix_length(first, t.context), len(t.context) - 1)
    return max(n, 0)


@torch.no_grad()
def pronoun_probabilities(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    pronouns: Sequence[str] = PRONOUNS,
    batch_size: int = 32,
    share_prefix: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """``p(pronoun | prompt)`` for every prompt: a float64 tensor of shape ``(N, len(pronouns))``.

    Under ``accelerate launch`` / ``torchrun`` each process scores a contiguous block of the
    prompts and all processes return the full tensor, in prompt order (:mod:`mg_editing.distributed`).

    Args:
        model: any Hugging Face causal LM (``AutoModelForCausalLM``), in eval mode.
        tokenizer: its tokenizer. Its pad token and padding side do not matter.
        prompts: the prompts, e.g. ``load_codegenbias("test")["prompt"]``.
        pronouns: continuations to score; ``("he", "she")`` for the FB-Score.
        batch_size: prompts per forward pass.
        share_prefix: run the token prefix shared by all prompts once and reuse its KV cache.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_vocabulary(model, tokenizer, pronouns)
    targets = encode_targets(tokenizer, prompts, pronouns)
    _check_length(model, targets)
    device = model_device(model)
    prefix_len = _shared_prefix_length(targets) if share_prefix else 0
    cache = None
    if prefix_len > 0:
        prefix = torch.tensor([targets[0][0].context[:prefix_len]], device=device)
        cache = _output_cache(model(input_ids=prefix, use_cache=True))
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            cache, prefix_len = None, 0  # a model without a reusable cache: score in full
    # Under a multi-process launch each process scores its block of prompts (distributed.py).
    local = local_part(targets)
    results = [torch.zeros(0, len(pronouns), dtype=torch.float64)]
    for start in tqdm(range(0, len(local), batch_size), desc="scoring", unit="batch", disable=not progress):
        chunk = local[start : start + batch_size]
        lp = _continuation_log_probs(model, _target_pairs(chunk), prefix_cache=cache, prefix_length=prefix_len)
        results.append(_combine(lp, len(chunk), len(pronouns)).double().cpu())
    return gather_tensor(torch.cat(results)).exp()


@torch.no_grad()
def pronoun_probabilities_naive(
    model: nn.Module, tokenizer, prompts: Sequence[str], *, pronouns: Sequence[str] = PRONOUNS
) -> torch.Tensor:
    """Reference scorer: one full forward per prompt and pronoun, no cache, no batching.

    The chain rule over the tokens of ``prompt + x`` that follow the longest token prefix it
    shares with ``prompt``. Slow; used to check the fast scorer and as the benchmark baseline.
    """
    device = model_device(model)
    out = torch.zeros(len(prompts), len(pronouns), dtype=torch.float64)

    def sequence_log_prob(ids: list[int], start: int) -> float:
        x = torch.tensor([ids], device=device)
        logp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
        return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))

    for i, prompt in enumerate(prompts):
        base = _encode(tokenizer, prompt)
        for j, x in enumerate(pronouns):
            full = _encode(tokenizer, prompt + x)
            n = _common_prefix_length(base, full)
            out[i, j] = math.exp(sequence_log_prob(full, n))
    return out


# -- FB-Score ---------------------------------------------------------------------------------
def _as_array(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def fb_score(
    p_he: Iterable[float],
    p_she: Iterable[float],
    fscore: Iterable[float],
    categories: Iterable[str] | None = None,
) -> dict:
    """The FB-Score (Eqs. 6-8) and its normalized variant, overall and per category.

    ``FB = |p_he - f_he| + |p_she - f_she|`` with ``f_he = (1 + fscore) / 2`` and
    ``f_she = (1 - fscore) / 2``, averaged over prompts; range [0, 2], lower is better.
    The normalized variant replaces the probabilities by ``p_he / (p_he + p_she)`` and its
    complement (it ignores mass on other continuations). It is reported beside the paper's
    number, never instead of it.

    Returns ``{"fb_score", "fb_score_normalized", "per_category", "per_category_normalized",
    "per_prompt", "n"}``; the per-category dicts follow Table III's column order.

    Example:
        >>> r = fb_score([0.5], [0.1], [0.0])
        >>> round(r["fb_score"], 6), round(r["fb_score_normalized"], 6)
        (0.4, 0.666667)
    """
    p_he, p_she, fs = _as_array(p_he, "p_he"), _as_array(p_she, "p_she"), _as_array(fscore, "fscore")
    if not (len(p_he) == len(p_she) == len(fs)):
        raise ValueError(f"p_he, p_she and fscore differ in length: {len(p_he)}, {len(p_she)}, {len(fs)}")
    if len(fs) == 0:
        raise ValueError("no predictions to score")
    if np.any((p_he < 0) | (p_he > 1) | (p_she < 0) | (p_she > 1)) or np.any(p_he + p_she > 1 + 1e-6):
        raise ValueError("p_he and p_she must be probabilities in [0, 1] with p_he + p_she <= 1")
    if np.any(np.abs(fs) > 1):
        raise ValueError("fscore must lie in [-1, 1]")
    f_he, f_she = (1 + fs) / 2, (1 - fs) / 2
    per_prompt = np.abs(p_he - f_he) + np.abs(p_she - f_she)
    total = p_he + p_she
    with np.errstate(invalid="ignore", divide="ignore"):
        n_he = np.where(total > 0, p_he / total, 0.5)
    per_prompt_norm = np.abs(n_he - f_he) + np.abs((1 - n_he) - f_she)
    result = {
        "fb_score": float(per_prompt.mean()),
        "fb_score_normalized": float(per_prompt_norm.mean()),
        "per_prompt": per_prompt.tolist(),
        "n": int(len(fs)),
    }
    if categories is not None:
        cats = np.asarray(list(categories), dtype=object)
        if len(cats) != len(fs):
            raise ValueError(f"categories has {len(cats)} entries for {len(fs)} predictions")
        unknown = sorted(set(cats) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown category {unknown[0]!r}; choose from {', '.join(CATEGORIES)}")
        present = [c for c in CATEGORIES if np.any(cats == c)]
        result["per_category"] = {c: float(per_prompt[cats == c].mean()) for c in present}
        result["per_category_normalized"] = {c: float(per_prompt_norm[cats == c].mean()) for c in present}
    return result


@dataclass
class ScoreResult:
    """Pronoun probabilities and FB-Scores of one model on one CodeGenBias selection."""

    p_he: np.ndarray
    p_she: np.ndarray
    metrics: dict

    @property
    def fb_score(self) -> float:
        return self.metrics["fb_score"]

    def table(self, name: str = "model") -> str:
        """The Table III layout (5 categories + average) as Markdown."""
        cats = [c for c in CATEGORIES if c in self.metrics.get("per_category", {})]
        head = "| Model | " + " | ".join(f"{c} (↓)" for c in cats) + " | Average (↓) |"
        rule = "|" + "---|" * (len(cats) + 2)
        row = f"| {name} | " + " | ".join(f"{self.metrics['per_category'][c]:.4f}" for c in cats)
        return "\n".join([head, rule, row + f" | {self.fb_score:.4f} |"])

    def to_dict(self) -> dict:
        return {"p_he": self.p_he.tolist(), "p_she": self.p_she.tolist(), **self.metrics}


def score_dataset(model: nn.Module, tokenizer, dataset, *, batch_size: int = 32, progress: bool = False) -> ScoreResult:
    """Score a CodeGenBias selection (a ``datasets.Dataset`` or list of row dicts)."""
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if not rows:
        raise ValueError("the dataset has no rows to score")
    probs = pronoun_probabilities(model, tokenizer, [r["prompt"] for r in rows], batch_size=batch_size, progress=progress)
    metrics = fb_score(probs[:, 0], probs[:, 1], [r["fscore"] for r in rows], [r["category"] for r in rows])
    return ScoreResult(probs[:, 0].numpy(), probs[:, 1].numpy(), metrics)
