"""The locating phase of MG-Editing at five granularities (paper Sec. IV-A, DESIGN.md 5-8).

Each finer granularity builds on the coarser ones, one stage per function, called in sequence
by :func:`locate`:

1. :func:`locate_layer` (Eq. 10): logit lens after every block; Importance(L_i) =
   ``|dp_he| + |dp_she|`` between the lens outputs before and after block ``i``. The key layer
   is the mode of the per-prompt argmax (or the argmax of the mean importance).
2. :func:`locate_modules` (Eq. 11): zero one weight module (weight and bias) of the key layer
   at a time and measure ``|dp_he| + |dp_she|`` at that layer's lens output. Rank, keep the
   top ``n_modules``.
3. :func:`locate_rows` (Eq. 12): for the top module ``M``, per prompt, the gradients
   ``Grad_x = d(-log p(x|prompt)) / dW_M``; importance of output row ``i`` is
   ``cos(Grad_he[i, :], Grad_she[i, :])``. Per-prompt top-k by *largest* cosine (the paper,
   Fig. 6: "the 1,480-th row ... has the largest cosine value"), then aggregated.
4. :func:`locate_neurons` (Eq. 13): within the located rows, importance
   ``|g_he(i, j) - g_she(i, j)|``; per-prompt top-k, aggregated the same way.

``full`` locates nothing (the paper skips it).

Multi-token pronouns: ``p^(i)(x)`` is the chain rule of the layer-``i`` lens over the
continuation positions of one forward pass on ``context + x[:-1]`` (the same targets as
:func:`mg_editing.scoring.encode_targets`, boundary merges included). The last block's lens
equals the model's own output, so the layer-``L-1`` value is exactly the scorer's ``p(x)``.

Aggregation of per-prompt top-k sets (rows and neurons): ``union`` (default; the paper's counts
are only possible for a union), ``intersection``, or ``frequency`` (kept when in the top-k of at
least ``min_frequency`` of the prompts: a float in ``(0, 1]`` is a fraction of the prompts, an
int ``>= 1`` a number of prompts).

Efficiency. Every stage batches prompts with right padding (causal attention never sees the
pads), and runs the model only as far as it must: the forward stops right after the last block
(the lens replaces the model's final norm + unembedding, at the target positions only); module
ablation replays only the key block from its captured inputs. Gradients are per-sample and in
closed form: a hook on ``M`` records its input ``X`` and makes its output a leaf that requires
grad, so no parameter ever requires grad and autograd only walks the blocks after ``M``. One
forward serves both pronouns (two ``autograd.grad`` calls on the output), and the per-prompt
weight gradient is ``Grad = gout^T X`` for the whole batch. All model state (eval/train mode,
``requires_grad`` flags, weights) is restored; ablation never writes a weight.

Example:
    >>> import sys; sys.path.insert(0, "tests")
    >>> from conftest import make_model, make_tokenizer
    >>> from mg_editing.data import load_codegenbias
    >>> tok = make_tokenizer(); model = make_model("codegen", len(tok))
    >>> prompts = load_codegenbias("dev")["prompt"][:4]
    >>> locs = locate(model, tok, prompts, granularity="row", top_k=3, progress=False)
    >>> locs.granularity, locs.layer is not None, len(locs.modules)
    ('row', True, 2)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from mg_editing.architecture import (
    ModelArchitecture,
    StopForward,
    get_architecture,
    in_features,
    is_conv1d,
    out_features,
    trace_layer_outputs,
)
from mg_editing.distributed import gather_tensor, local_part, reduce_sum
from mg_editing.locations import GRANULARITIES, Locations, check_granularity
from mg_editing.scoring import PRONOUNS, PronounTarget, check_vocabulary, encode_targets, model_device

__all__ = [
    "AGGREGATIONS",
    "LayerResult",
    "ModuleResult",
    "NeuronResult",
    "RowResult",
    "aggregate_topk",
    "locate",
    "locate_layer",
    "locate_modules",
    "locate_neurons",
    "locate_rows",
    "module_gradients",
    "zeroed_modules",
]

AGGREGATIONS: tuple[str, ...] = ("union", "intersection", "frequency")
LAYER_SELECTIONS: tuple[str, ...] = ("mode", "mean")
ROW_RANKINGS: tuple[str, ...] = ("largest", "smallest", "absolute")


# -- inputs ----------------------------------------------------------------------------------
def _prompts_of(dataset) -> list[str]:
    """Prompts from a ``datasets.Dataset``, a list of row dicts, or a list of strings."""
    if dataset is None:
        raise ValueError("no dataset given: pass a datasets.Dataset with a 'prompt' column or a list of prompts")
    if isinstance(dataset, str):
        raise TypeError("pass a list of prompts (or a dataset), not a single string")
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None:
        if "prompt" not in column_names:
            raise ValueError(f"the dataset has no 'prompt' column (columns: {column_names})")
        prompts = list(dataset["prompt"])
    else:
        items = list(dataset)
        if items and isinstance(items[0], dict):
            if any("prompt" not in r for r in items):
                raise ValueError("every dataset row needs a 'prompt' field")
            prompts = [r["prompt"] for r in items]
        else:
            prompts = items
    if not prompts:
        raise ValueError("the dataset has no rows: there is nothing to locate with")
    return prompts




@dataclass
class _Batch:
    """A padded batch of forward sequences and where each (prompt, pronoun) is read."""

    input_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, T)
    seq_row: torch.Tensor  # (P, K): batch row holding prompt p's pronoun k
    pick_row: torch.Tensor  # (n,) positions that predict continuation tokens
    pick_pos: torch.Tensor
    pick_tok: torch.Tensor
    pick_owner: torch.Tensor  # (n,) index p * K + k
    n_prompts: int
    n_pronouns: int


def _make_batch(targets: Sequence[tuple[PronounTarget, ...]], device: torch.device) -> _Batch:
    rows: dict[tuple[int, ...], int] = {}
    seq_row = torch.zeros(len(targets), len(targets[0]), dtype=torch.long)
    pick_row, pick_pos, pick_tok, pick_owner = [], [], [], []
    for p, per_prompt in enumerate(targets):
        for k, t in enumerate(per_prompt):
            seq = tuple(t.context) + tuple(t.target[:-1])
            r = rows.setdefault(seq, len(rows))
            seq_row[p, k] = r
            for j, tok in enumerate(t.target):
                pick_row.append(r)
                pick_pos.append(len(t.context) - 1 + j)
                pick_tok.append(tok)
                pick_owner.append(p * len(per_prompt) + k)
    seqs = list(rows)
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return _Batch(
        input_ids.to(device), mask.to(device), seq_row.to(device),
        as_t(pick_row), as_t(pick_pos), as_t(pick_tok), as_t(pick_owner),
        len(targets), len(targets[0]),
    )


def _batches(targets, batch_size: int, device, desc: str, progress: bool) -> Iterator[tuple[int, _Batch]]:
    """Batches of this process's block of the prompts (all of them in a single process); each
    stage gathers its per-prompt results with :func:`mg_editing.distributed.gather_tensor`."""
    from tqdm.auto import tqdm

    local = local_part(targets)
    for start in tqdm(range(0, len(local), batch_size), desc=desc, unit="batch", disable=not progress):
        yield start, _make_batch(local[start : start + batch_size], device)


def _lens_log_probs(arch: ModelArchitecture, hidden: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """Chain-rule ``log p(x | prompt)`` read through the logit lens of ``hidden``: ``(P, K)``."""
    # With a device_map the blocks and the unembedding may sit on different devices.
    picked = hidden[batch.pick_row.to(hidden.device), batch.pick_pos.to(hidden.device)]
    logits = arch.logits(picked).float()
    device = logits.device
    token_lp = torch.log_softmax(logits, dim=-1).gather(1, batch.pick_tok.to(device)[:, None])[:, 0]
    out = torch.zeros(batch.n_prompts * batch.n_pronouns, dtype=token_lp.dtype, device=device)
    return out.index_add(0, batch.pick_owner.to(device), token_lp).view(batch.n_prompts, batch.n_pronouns)


def _gather(parts: list[torch.Tensor], row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """This process's per-prompt results (a list of ``(n_i, *row_shape)``), concatenated with
    every other process's in prompt order (:func:`mg_editing.distributed.gather_tensor`)."""
    local = torch.cat(parts) if parts else torch.zeros((0, *row_shape), dtype=dtype)
    return gather_tensor(local)


def _gather_rows(rows: list[torch.Tensor], row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """:func:`_gather` for a list of one-prompt results, each of shape ``row_shape``."""
    return _gather([torch.stack(rows)] if rows else [], row_shape, dtype)


# -- running the blocks ----------------------------------------------------------------------
def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _forward_blocks(arch: ModelArchitecture, batch: _Batch, stop_after: int) -> dict[int, torch.Tensor]:
    """Run the model up to (and including) block ``stop_after``; the residual stream after each.

    Returns ``{-1: embedding output, i: output of block i}`` for ``i <= stop_after``.
    """
    with trace_layer_outputs(arch, stop_after=stop_after) as store:
        try:
            arch.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except StopForward:
            pass
    if stop_after not in store:
        raise RuntimeError(f"block {stop_after} did not run in the forward pass of {type(arch.model).__name__}")
    return store


def _block_inputs(arch: ModelArchitecture, batch: _Batch, layer: int) -> tuple[tuple, dict]:
    """The positional and keyword inputs block ``layer`` receives; the forward stops there."""
    captured: dict[str, Any] = {}

    def grab(_module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise StopForward

    handle = arch.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        arch.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise RuntimeError(f"block {layer} did not run in the forward pass of {type(arch.model).__name__}")
    return captured["args"], captured["kwargs"]


@contextlib.contextmanager
def zeroed_modules(*modules: nn.Module) -> Iterator[None]:
    """Behave as if each module's weight and bias were zero, without touching them.

    A Linear/Conv1D with zero weight and bias outputs zeros, so a forward hook returns zeros;
    the parameters are never written, so leaving the ``with`` restores the model bit-exactly.
    """
    handles = [m.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out)) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter requiring grad; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


# -- stage 1: layer --------------------------------------------------------------------------
@dataclass
class LayerResult:
    """Per-prompt logit-lens probabilities and layer importances (Eq. 10)."""

    key_layer: int
    #: (N, L + 1, K): lens p(x) after the embeddings (index 0) and after each block
    lens_probs: torch.Tensor
    #: (N, L): Importance(L_i) per prompt
    importance: torch.Tensor
    argmax_counts: torch.Tensor  # (L,)
    selection: str = "mode"

    def scores(self) -> dict[str, torch.Tensor]:
        mean = self.lens_probs.mean(0)
        return {
            "layer_importance": self.importance.mean(0),
            "layer_argmax_counts": self.argmax_counts,
            "lens_p_he": mean[:, 0],
            "lens_p_she": mean[:, 1],
        }


def _select_layer(importance: torch.Tensor, selection: str) -> tuple[int, torch.Tensor]:
    counts = torch.bincount(importance.argmax(1), minlength=importance.shape[1])
    mean = importance.mean(0)
    if selection == "mean":
        return int(mean.argmax()), counts
    # Mode of the per-prompt argmax; ties go to the layer with the larger mean importance.
    tied = (counts == counts.max()).nonzero()[:, 0]
    return int(tied[mean[tied].argmax()]), counts


@torch.no_grad()
def locate_layer(
    model: nn.Module,
    targets: Sequence[tuple[PronounTarget, ...]],
    *,
    layer_selection: str = "mode",
    batch_size: int = 8,
    progress: bool = False,
) -> LayerResult:
    """Eq. 10 on every prompt: lens probabilities after each block and the key layer."""
    if layer_selection not in LAYER_SELECTIONS:
        raise ValueError(f"unknown layer_selection {layer_selection!r}; choose from {', '.join(LAYER_SELECTIONS)}")
    arch = get_architecture(model)
    n_layers = arch.num_layers
    probs = []
    with _frozen(model):
        for _, batch in _batches(targets, batch_size, model_device(model), "locate: layers", progress):
            store = _forward_blocks(arch, batch, n_layers - 1)
            lp = torch.stack([_lens_log_probs(arch, store[i], batch) for i in range(-1, n_layers)], dim=1)
            probs.append(lp.double().exp().cpu())
    lens_probs = _gather(probs, (n_layers + 1, len(targets[0])), torch.float64)  # (N, L + 1, K)
    importance = (lens_probs[:, 1:] - lens_probs[:, :-1]).abs().sum(-1)
    key, counts = _select_layer(importance, layer_selection)
    return LayerResult(key, lens_probs, importance, counts, layer_selection)


# -- stage 2: module -------------------------------------------------------------------------
@dataclass
class ModuleResult:
    """Zero-ablation importance (Eq. 11) of every weight module of the key layer."""

    layer: int
    names: list[str]  # the layer's weight modules, in definition order
    importance: torch.Tensor  # (N, n_modules) per prompt
    ranking: list[str]  # names sorted by mean importance, most important first

    def scores(self) -> dict[str, torch.Tensor]:
        return {"module_importance": self.importance.mean(0)}


@torch.no_grad()
def locate_modules(
    model: nn.Module,
    targets: Sequence[tuple[PronounTarget, ...]],
    layer: int,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> ModuleResult:
    """Eq. 11: ablate each weight module of block ``layer`` in turn; ``|dp_he| + |dp_she|``.

    The blocks before ``layer`` run once per batch; the key block alone is replayed from its
    captured inputs for the unablated reference and for each ablation.
    """
    arch = get_architecture(model)
    layer = arch.check_layer(layer)
    modules = arch.weight_modules(layer)
    names = list(modules)
    block = arch.layers[layer]
    rows = []
    with _frozen(model):
        for _, batch in _batches(targets, batch_size, model_device(model), "locate: modules", progress):
            args, kwargs = _block_inputs(arch, batch, layer)
            reference = _lens_log_probs(arch, _first(block(*args, **kwargs)), batch).double().exp()
            deltas = []
            for name in names:
                with zeroed_modules(modules[name]):
                    ablated = _lens_log_probs(arch, _first(block(*args, **kwargs)), batch).double().exp()
                deltas.append((ablated - reference).abs().sum(-1))
            rows.append(torch.stack(deltas, dim=1).cpu())
    importance = _gather(rows, (len(names),), torch.float64)
    order = importance.mean(0).argsort(descending=True, stable=True)
    return ModuleResult(layer, names, importance, [names[i] for i in order])


# -- gradients -------------------------------------------------------------------------------
@contextlib.contextmanager
def _capture_module(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the module's input; make its output a grad-requiring leaf (autograd stops there)."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        if "out" in store:
            raise RuntimeError("the located module ran twice in one forward pass; cannot attribute its gradient")
        store["x"] = args[0].detach()
        store["out"] = output.detach().requires_grad_(True)
        return store["out"].clone()  # a non-leaf, so an in-place op after the module is allowed

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _batch_gradients(arch: ModelArchitecture, module: nn.Module, batch: _Batch):
    """Per-sequence output grads and inputs of ``module`` for ``-log p(x)``, one forward.

    Returns ``(gout, x)``: ``gout`` is ``(K, R, T, out)`` (one per pronoun), ``x`` ``(R, T, in)``.
    The weight gradient of prompt ``p`` for pronoun ``k`` is ``gout[k, r]^T @ x[r]`` with
    ``r = seq_row[p, k]`` (prompts sit in different rows, so a summed loss separates them).
    """
    with torch.enable_grad(), _capture_module(module) as cap:
        store = _forward_blocks(arch, batch, arch.num_layers - 1)
        if "out" not in cap:
            raise RuntimeError("the located module did not run in the forward pass")
        nll = -_lens_log_probs(arch, store[arch.num_layers - 1], batch)
        grads = []
        for k in range(batch.n_pronouns):
            (g,) = torch.autograd.grad(nll[:, k].sum(), cap["out"], retain_graph=k + 1 < batch.n_pronouns)
            grads.append(g.float())
    return torch.stack(grads), cap["x"].float()


def module_gradients(
    model: nn.Module, targets: Sequence[tuple[PronounTarget, ...]], module_name: str, *, batch_size: int = 8
) -> torch.Tensor:
    """Per-prompt weight gradients ``d(-log p(x|prompt)) / dW``, ``(N, K, out, in)`` (``out x in``).

    Materialises every gradient; meant for inspection and tests on small models.
    """
    arch = get_architecture(model)
    module = arch.module(module_name)
    out = []
    with _frozen(model):
        for _, batch in _batches(targets, batch_size, model_device(model), "gradients", False):
            gout, x = _batch_gradients(arch, module, batch)
            for p in range(batch.n_prompts):
                rows = [int(r) for r in batch.seq_row[p]]
                out.append(torch.stack([gout[k, r].T @ x[r].to(gout.device) for k, r in enumerate(rows)]).cpu())
    return _gather_rows(out, (len(targets[0]), out_features(module), in_features(module)), torch.float32)


# -- aggregation -----------------------------------------------------------------------------
def _threshold(aggregate: str, min_frequency: float | int, n_prompts: int) -> int:
    if aggregate == "union":
        return 1
    if aggregate == "intersection":
        return n_prompts
    if aggregate != "frequency":
        raise ValueError(f"unknown aggregate {aggregate!r}; choose from {', '.join(AGGREGATIONS)}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, (int, float)):
        raise TypeError(f"min_frequency must be a fraction (float) or a prompt count (int), got {min_frequency!r}")
    if isinstance(min_frequency, float):
        if not 0.0 < min_frequency <= 1.0:
            raise ValueError(f"min_frequency as a fraction must lie in (0, 1], got {min_frequency}")
        return max(1, math.ceil(min_frequency * n_prompts - 1e-9))
    if not 1 <= min_frequency <= n_prompts:
        raise ValueError(f"min_frequency as a prompt count must lie in [1, {n_prompts}] (the prompts), got {min_frequency}")
    return int(min_frequency)


def aggregate_topk(
    topk: torch.Tensor, size: int, aggregate: str = "union", min_frequency: float | int = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-prompt top-k index sets ``(N, k)`` over ``range(size)``.

    Returns ``(selected, counts)``: the sorted indices kept and, for every index, the number
    of prompts whose top-k holds it. ``union`` keeps counts >= 1, ``intersection`` counts == N,
    ``frequency`` counts >= ``min_frequency`` (fraction of N if a float, a count if an int).

    Example:
        >>> sel, counts = aggregate_topk(torch.tensor([[0, 1], [1, 2]]), 4, "intersection")
        >>> sel.tolist(), counts.tolist()
        ([1], [1, 2, 1, 0])
    """
    threshold = _threshold(aggregate, min_frequency, topk.shape[0])
    counts = torch.bincount(topk.reshape(-1).cpu(), minlength=size)
    return (counts >= threshold).nonzero()[:, 0], counts


def _rank_values(cos: torch.Tensor, ranking: str) -> torch.Tensor:
    if ranking == "largest":
        return cos
    if ranking == "smallest":
        return -cos
    if ranking == "absolute":
        return cos.abs()
    raise ValueError(f"unknown row_ranking {ranking!r}; choose from {', '.join(ROW_RANKINGS)}")


#: Cosines equal to this many decimals tie (at the last block they are all +-1 up to rounding).
COSINE_DECIMALS = 4


def _top_rows(cos: torch.Tensor, magnitude: torch.Tensor, ranking: str, top_k: int) -> torch.Tensor:
    """Per-prompt top-k rows by (rounded) cosine, ties broken by gradient magnitude.

    ``cos`` and ``magnitude`` are ``(N, out)``; ``magnitude`` is ``|Grad_he[i]| * |Grad_she[i]|``.
    In the last block only the last position's output gradient is non-zero, so each row's
    gradient is rank one and every cosine is exactly +-1 (docs/decisions.md): without the
    tie-break the ranking would follow float noise.
    """
    key = torch.round(_rank_values(cos, ranking) * 10**COSINE_DECIMALS)
    by_magnitude = magnitude.argsort(dim=1, descending=True, stable=True)
    by_key = key.gather(1, by_magnitude).argsort(dim=1, descending=True, stable=True)
    return by_magnitude.gather(1, by_key)[:, :top_k]


def _empty_selection(what: str, aggregate: str) -> ValueError:
    return ValueError(
        f"{aggregate} aggregation kept no {what}: the per-prompt top-k sets do not overlap enough. "
        "Use aggregate='union', a lower min_frequency, a larger top-k, or fewer prompts."
    )


# -- stage 3: row ----------------------------------------------------------------------------
@dataclass
class RowResult:
    """Row importance (Eq. 12) of one module and the aggregated per-prompt top-k rows."""

    module: str
    rows: torch.Tensor  # located rows, sorted
    mean_cosine: torch.Tensor  # (out,)
    counts: torch.Tensor  # (out,): prompts whose top-k holds each row
    topk: torch.Tensor  # (N, k) per-prompt top rows, best first

    def scores(self) -> dict[str, torch.Tensor]:
        return {"row_importance": self.mean_cosine, "row_topk_counts": self.counts}


def _check_grad_module(arch: ModelArchitecture, module_name: str) -> nn.Module:
    module = arch.module(module_name)
    if not isinstance(module, nn.Linear) and not is_conv1d(module):
        raise TypeError(f"{module_name} is a {type(module).__name__}, not a Linear or Conv1D")
    return module


def locate_rows(
    model: nn.Module,
    targets: Sequence[tuple[PronounTarget, ...]],
    module_name: str,
    *,
    top_k: int = 10,
    aggregate: str = "union",
    min_frequency: float | int = 0.5,
    row_ranking: str = "largest",
    batch_size: int = 8,
    progress: bool = False,
) -> RowResult:
    """Eq. 12: per prompt, ``cos(Grad_he[i, :], Grad_she[i, :])`` for every output row ``i``."""
    arch = get_architecture(model)
    module = _check_grad_module(arch, module_name)
    n_out = out_features(module)
    _check_top_k(top_k, n_out, f"rows: {module_name} has {n_out} output rows")
    _rank_values(torch.zeros(1), row_ranking)
    _threshold(aggregate, min_frequency, len(targets))
    if len(targets[0]) != 2:
        raise ValueError(f"row locating compares two pronouns, got {len(targets[0])}")
    cosines, magnitudes = [], []
    with _frozen(model):
        for _, batch in _batches(targets, batch_size, model_device(model), "locate: rows", progress):
            gout, x = _batch_gradients(arch, module, batch)
            for p in range(batch.n_prompts):
                r_he, r_she = int(batch.seq_row[p, 0]), int(batch.seq_row[p, 1])
                g_he = gout[0, r_he].T @ x[r_he].to(gout.device)
                g_she = gout[1, r_she].T @ x[r_she].to(gout.device)
                cosines.append(torch.nn.functional.cosine_similarity(g_he, g_she, dim=1).cpu())
                magnitudes.append((g_he.norm(dim=1) * g_she.norm(dim=1)).cpu())
    cos = _gather_rows(cosines, (n_out,), torch.float32)  # (N, out)
    magnitude = _gather_rows(magnitudes, (n_out,), torch.float32)
    topk = _top_rows(cos, magnitude, row_ranking, top_k)
    rows, counts = aggregate_topk(topk, n_out, aggregate, min_frequency)
    if rows.numel() == 0:
        raise _empty_selection("row", aggregate)
    return RowResult(module_name, rows, cos.mean(0), counts, topk)


def _check_top_k(top_k: int, available: int, what: str) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if top_k > available:
        raise ValueError(f"top_k={top_k} is larger than the number of candidate {what}")


# -- stage 4: neuron -------------------------------------------------------------------------
@dataclass
class NeuronResult:
    """Neuron importance (Eq. 13) within the located rows, and the aggregated top-k neurons."""

    module: str
    rows: torch.Tensor  # the located rows the search ran in (sorted)
    neurons: torch.Tensor  # (2, n) located (row, column) pairs, sorted
    mean_importance: torch.Tensor  # (len(rows), in)
    counts: torch.Tensor  # (len(rows), in)
    top_row: int

    def scores(self) -> dict[str, torch.Tensor]:
        i = int((self.rows == self.top_row).nonzero()[0, 0])
        return {
            "neuron_importance": self.mean_importance,
            "neuron_topk_counts": self.counts,
            "neuron_rows": self.rows,
            "neuron_importance_top_row": self.mean_importance[i].clone(),
        }


def locate_neurons(
    model: nn.Module,
    targets: Sequence[tuple[PronounTarget, ...]],
    module_name: str,
    rows: torch.Tensor,
    *,
    top_k: int = 100,
    aggregate: str = "union",
    min_frequency: float | int = 0.5,
    top_row: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> NeuronResult:
    """Eq. 13: per prompt, ``|g_he(i, j) - g_she(i, j)|`` for ``i`` in ``rows``, every column ``j``.

    ``top_row`` (default: the first of ``rows``) only picks which row's importance is kept as
    ``neuron_importance_top_row`` for the Fig. 7 plot.
    """
    arch = get_architecture(model)
    module = _check_grad_module(arch, module_name)
    rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1).sort().values
    n_out, n_in = out_features(module), in_features(module)
    if rows.numel() == 0:
        raise ValueError("no rows to search for neurons in")
    if rows.min() < 0 or rows.max() >= n_out:
        raise ValueError(f"row indices out of range for {module_name} ({n_out} rows)")
    _check_top_k(top_k, rows.numel() * n_in, f"neurons: {rows.numel()} located rows x {n_in} columns")
    _threshold(aggregate, min_frequency, len(targets))
    device = model_device(model)
    rows_dev = rows.to(device)
    diffs_sum = torch.zeros(rows.numel(), n_in, dtype=torch.float64)
    topks = []
    with _frozen(model):
        for _, batch in _batches(targets, batch_size, device, "locate: neurons", progress):
            gout, x = _batch_gradients(arch, module, batch)
            gout = gout[..., rows_dev.to(gout.device)]  # only the located rows' output grads
            for p in range(batch.n_prompts):
                r_he, r_she = int(batch.seq_row[p, 0]), int(batch.seq_row[p, 1])
                diff = (gout[0, r_he].T @ x[r_he].to(gout.device) - gout[1, r_she].T @ x[r_she].to(gout.device)).abs()
                diffs_sum += diff.double().cpu()
                topks.append(diff.reshape(-1).topk(top_k).indices.cpu())
    diffs_sum = reduce_sum(diffs_sum)
    topk = _gather_rows(topks, (top_k,), torch.long)  # flat indices into (len(rows), in)
    flat, counts = aggregate_topk(topk, rows.numel() * n_in, aggregate, min_frequency)
    if flat.numel() == 0:
        raise _empty_selection("neuron", aggregate)
    neurons = torch.stack([rows[flat // n_in], flat % n_in])
    top = int(rows[0]) if top_row is None else int(top_row)
    if top not in rows.tolist():
        raise ValueError(f"top_row {top} is not among the searched rows")
    mean = (diffs_sum / len(targets)).float()
    return NeuronResult(module_name, rows, neurons, mean, counts.view(rows.numel(), n_in), top)


# -- the pipeline ----------------------------------------------------------------------------
def _layer_of(arch: ModelArchitecture, name: str) -> int:
    for i in range(arch.num_layers):
        if name in arch.weight_modules(i):
            return i
    raise KeyError(f"{name!r} is not a weight module of any decoder block")


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def locate(
    model: nn.Module,
    tokenizer,
    dataset,
    granularity: str = "row",
    *,
    pronouns: Sequence[str] = PRONOUNS,
    layer_selection: str = "mode",
    layer: int | None = None,
    modules: Sequence[str] | None = None,
    n_modules: int = 2,
    top_k: int = 10,
    aggregate: str = "union",
    min_frequency: float | int = 0.5,
    neuron_top_k: int = 100,
    row_ranking: str = "largest",
    batch_size: int = 8,
    progress: bool = True,
) -> Locations:
    """Locate the parameters responsible for the bias at ``granularity``.

    Args:
        model: any Hugging Face causal LM; left exactly as it was found.
        tokenizer: its tokenizer.
        dataset: a ``datasets.Dataset`` / list of rows with a ``prompt`` column, or a list of
            prompt strings (the paper uses CodeGenBias train + dev).
        granularity: ``full`` (nothing to locate), ``layer``, ``module``, ``row`` or ``neuron``.
        pronouns: the two continuations compared, ``("he", "she")``.
        layer_selection: key layer as the ``mode`` of the per-prompt argmax (paper) or the
            argmax of the ``mean`` importance.
        layer: skip layer locating and use this key layer.
        modules: skip module locating and use these modules (ranked; the first is the one rows
            are located in). Their key layer is the first module's block.
        n_modules: modules kept at module level (the paper keeps a coupled pair).
        top_k: rows kept per prompt before aggregation.
        aggregate: ``union`` (default), ``intersection`` or ``frequency``, for rows and neurons.
        min_frequency: for ``frequency``: a float in (0, 1] is a fraction of the prompts, an
            int >= 1 a number of prompts.
        neuron_top_k: neurons kept per prompt (within the located rows) before aggregation.
        row_ranking: ``largest`` cosine first (the paper, Fig. 6), ``smallest``, or ``absolute``.
        batch_size: prompts per forward pass.
        progress: show progress bars.

    Returns:
        :class:`~mg_editing.locations.Locations`. At row/neuron level ``modules`` holds the
        ranked located modules and ``rows``/``neurons`` the indices in the top one. Stage
        results go into ``scores`` (``layer_importance``, ``layer_argmax_counts``,
        ``lens_p_he``, ``lens_p_she``, ``module_importance``, ``row_importance``,
        ``row_topk_counts``, ``neuron_importance``, ``neuron_importance_top_row``...) and
        ``meta`` (options, prompt count, model name, module order, ranking).
    """
    check_granularity(granularity)
    level = GRANULARITIES.index(granularity)
    prompts = _prompts_of(dataset)
    pronouns = tuple(pronouns)
    if len(pronouns) != 2:
        raise ValueError(f"locating compares exactly two pronouns, got {pronouns}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for name, value in (("layer_selection", layer_selection), ("aggregate", aggregate), ("row_ranking", row_ranking)):
        choices = {"layer_selection": LAYER_SELECTIONS, "aggregate": AGGREGATIONS, "row_ranking": ROW_RANKINGS}[name]
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")
    _threshold(aggregate, min_frequency, len(prompts))
    arch = get_architecture(model)
    if not isinstance(n_modules, int) or n_modules < 1:
        raise ValueError(f"n_modules must be a positive integer, got {n_modules!r}")

    meta: dict[str, Any] = {
        "model": _model_name(model),
        "model_type": arch.spec.model_type,
        "num_layers": arch.num_layers,
        "n_prompts": len(prompts),
        "pronouns": list(pronouns),
        "options": {
            "granularity": granularity, "layer_selection": layer_selection, "n_modules": n_modules,
            "top_k": top_k, "aggregate": aggregate, "min_frequency": min_frequency,
            "neuron_top_k": neuron_top_k, "row_ranking": row_ranking, "batch_size": batch_size,
            "layer": layer, "modules": list(modules) if modules is not None else None,
        },
    }
    if granularity == "full":
        return Locations("full", meta=meta)

    # Validate cheap options before any model work.
    if modules is not None:
        modules = list(modules)
        if not modules:
            raise ValueError("modules=[] given: pass at least one module name, or None to locate them")
        for name in modules:
            arch.module(name)  # KeyError with the modules that exist
        if layer is None:
            layer = _layer_of(arch, modules[0])
    if layer is not None:
        layer = arch.check_layer(layer)
    if level >= GRANULARITIES.index("module") and modules is None:
        available = len(arch.weight_modules(layer if layer is not None else 0))
        if n_modules > available:
            raise ValueError(f"n_modules={n_modules} but a decoder block has only {available} weight modules")
    if level >= GRANULARITIES.index("row"):
        # Exact checks run in the stages; these catch impossible values before any model work.
        candidates = [arch.module(modules[0])] if modules is not None else list(arch.weight_modules(layer or 0).values())
        _check_top_k(top_k, max(out_features(m) for m in candidates), "rows in the module(s) rows can be located in")
    if level >= GRANULARITIES.index("neuron"):
        _check_top_k(neuron_top_k, top_k * max(in_features(m) for m in arch.weight_modules().values()), "neurons")

    check_vocabulary(model, tokenizer, pronouns)
    targets = encode_targets(tokenizer, prompts, pronouns)
    meta["multi_token"] = any(len(t.target) > 1 for per_prompt in targets for t in per_prompt)
    scores: dict[str, torch.Tensor] = {}

    if layer is None:
        layer_result = locate_layer(model, targets, layer_selection=layer_selection, batch_size=batch_size, progress=progress)
        layer = layer_result.key_layer
        scores.update(layer_result.scores())
    meta["layer_name"] = arch.layer_name(layer)
    if granularity == "layer":
        return Locations("layer", layer=layer, scores=scores, meta=meta)

    if modules is None:
        module_result = locate_modules(model, targets, layer, batch_size=batch_size, progress=progress)
        modules = module_result.ranking[:n_modules]
        scores.update(module_result.scores())
        meta["module_order"] = module_result.names
        meta["module_ranking"] = module_result.ranking
    if granularity == "module":
        return Locations("module", modules=modules, layer=layer, scores=scores, meta=meta)

    row_result = locate_rows(
        model, targets, modules[0], top_k=top_k, aggregate=aggregate, min_frequency=min_frequency,
        row_ranking=row_ranking, batch_size=batch_size, progress=progress,
    )
    scores.update(row_result.scores())
    rank = _rank_values(row_result.mean_cosine[row_result.rows], row_ranking)
    top_row = int(row_result.rows[rank.argmax()])
    meta["row_module"] = modules[0]
    meta["top_row"] = top_row
    meta["module_is_conv1d"] = is_conv1d(arch.module(modules[0]))
    rows = {modules[0]: row_result.rows}
    if granularity == "row":
        return Locations("row", modules=modules, layer=layer, rows=rows, scores=scores, meta=meta)

    neuron_result = locate_neurons(
        model, targets, modules[0], row_result.rows, top_k=neuron_top_k, aggregate=aggregate,
        min_frequency=min_frequency, top_row=top_row, batch_size=batch_size, progress=progress,
    )
    scores.update(neuron_result.scores())
    meta["n_neurons"] = int(neuron_result.neurons.shape[1])
    return Locations(
        "neuron", modules=modules, layer=layer, rows=rows, neurons={modules[0]: neuron_result.neurons},
        scores=scores, meta=meta,
    )
