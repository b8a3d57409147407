"""Options shared by the commands: model loading (score, locate, edit, run) and the edit loop's
scale-out settings (edit, run)."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("fp32", "fp16", "bf16")


def max_memory(text: str) -> dict:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"--max-memory takes DEVICE=SIZE pairs such as 0=20GiB,cpu=64GiB; got {part!r}")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    if not out:
        raise argparse.ArgumentTypeError("--max-memory is empty")
    return out


def add_model_arguments(parser: argparse.ArgumentParser, *, model: bool = True) -> None:
    if model:
        parser.add_argument("--model", required=True, help="Hub id, local path, or 'demo'")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="weights' dtype (default: the checkpoint's)")
    parser.add_argument("--device", default=None,
                        help="e.g. cpu, cuda, cuda:1 (default: cpu; under accelerate launch/torchrun: each process's own device)")
    parser.add_argument("--device-map", default=None,
                        help="shard one model over several devices, e.g. 'auto' (accelerate's big-model placement)")
    parser.add_argument("--max-memory", type=max_memory, default=None,
                        help="with --device-map: per-device budget, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    parser.add_argument("--offload-folder", default=None, help="with --device-map: where weights that fit nowhere go on disk")


def load_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for :func:`mg_editing.models.load_model_and_tokenizer`."""
    kwargs = dict(dtype=args.dtype, device=args.device, device_map=args.device_map)
    if args.max_memory is not None or args.offload_folder is not None:
        if args.device_map is None:
            from mg_editing.cli import UserError

            raise UserError("--max-memory and --offload-folder need --device-map")
        if args.max_memory is not None:
            kwargs["max_memory"] = args.max_memory
        if args.offload_folder is not None:
            kwargs["offload_folder"] = args.offload_folder
    return kwargs


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The edit loop's precision/memory options (:class:`mg_editing.edit.EditConfig` fields)."""
    from mg_editing.edit import MIXED_PRECISIONS

    parser.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default="no",
                        help="autocast the training forwards (accelerate); the deltas keep the model's dtype. "
                             "fp16 needs a GPU and an fp32 model; use bf16 on CPU (default: no)")
    parser.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1, metavar="N",
                        help="micro-batches per optimizer update: each step sees N x the batch size (default 1)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute layer activations in the backward pass: less memory, slower steps; "
                             "for full/layer/module edits of large models")


def training_options(args: argparse.Namespace) -> dict:
    """The :class:`mg_editing.edit.EditConfig` fields set by :func:`add_training_arguments`."""
    return dict(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
                gradient_checkpointing=args.gradient_checkpointing)
