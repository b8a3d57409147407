"""``mg-edit edit``: one MG-Edit at one granularity, saved as a PEFT adapter (optionally pushed).

Scale-out: ``--device-map auto`` (with ``--max-memory``) spreads one large model over the
visible devices in one process; ``accelerate launch`` / ``torchrun`` runs data-parallel
processes (each holds a replica, takes a part of each batch, and process 0 writes the
adapter). ``--mixed-precision``, ``--gradient-accumulation-steps`` and
``--gradient-checkpointing`` map to :class:`mg_editing.edit.EditConfig`.

Example:
    >>> from mg_editing.cli import build_parser
    >>> args = build_parser().parse_args(["edit", "--model", "demo", "--granularity", "layer", "--out", "adapter",
    ...                                    "--dtype", "fp32", "--mixed-precision", "bf16", "--gradient-accumulation-steps", "4",
    ...                                    "--gradient-checkpointing"])
    >>> args.mixed_precision, args.gradient_accumulation_steps, args.gradient_checkpointing
    ('bf16', 4, True)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from mg_editing.cli._model_args import add_model_arguments, add_training_arguments, load_kwargs, training_options
from mg_editing.locations import GRANULARITIES


def register(subparsers) -> None:
    parser = subparsers.add_parser("edit", help="locate (or load locations) and edit at one granularity; save the adapter")
    add_model_arguments(parser)
    parser.add_argument("--granularity", required=True, choices=GRANULARITIES)
    parser.add_argument("--locations", default=None, help="folder written by `mg-edit locate` (default: locate now on train+dev)")
    parser.add_argument("--objective", choices=("fb", "paper"), default="fb")
    parser.add_argument("--steps", type=int, default=None, help="optimizer updates (default 200)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts per micro-batch, over all processes together (default 16)")
    parser.add_argument("--recovery-weight", type=float, default=None)
    add_training_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="adapter folder")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload the adapter to this Hub repo")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from peft import get_peft_model

    from mg_editing.data import load_codegenbias
    from mg_editing.distributed import is_main_process, wait_for_everyone
    from mg_editing.edit import EditConfig, edit
    from mg_editing.hub import adapter_model_card, push_adapter, save_adapter
    from mg_editing.locate import locate
    from mg_editing.locations import Locations
    from mg_editing.models import load_model_and_tokenizer
    from mg_editing.scoring import score_dataset
    from mg_editing.tuner import MGEditConfig

    overrides = {k: v for k, v in dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size, recovery_weight=args.recovery_weight).items() if v is not None}
    config = EditConfig(objective=args.objective, seed=args.seed, **training_options(args), **overrides)
    model, tokenizer = load_model_and_tokenizer(args.model, **load_kwargs(args))
    if args.locations:
        locations = Locations.load(args.locations).coarsen(args.granularity)
    elif args.granularity == "full":
        locations = Locations("full")
    else:
        locations = locate(model, tokenizer, load_codegenbias("train+dev"), args.granularity)
    if is_main_process():
        print(f"locations: {locations!r}")
    train, test = load_codegenbias("train"), load_codegenbias("test")
    before = {"reliability_fb": score_dataset(model, tokenizer, train, progress=True).fb_score,
              "generality_fb": score_dataset(model, tokenizer, test, progress=True).fb_score}
    peft_model = get_peft_model(model, MGEditConfig(granularity=args.granularity, locations=locations))
    out = Path(args.out)
    result = edit(peft_model, tokenizer, train, dev_dataset=load_codegenbias("dev"), config=config, history_path=out / "edit_history.json")
    after = {"reliability_fb": score_dataset(peft_model, tokenizer, train, progress=True).fb_score,
             "generality_fb": score_dataset(peft_model, tokenizer, test, progress=True).fb_score}
    card = adapter_model_card(base_model=str(args.model if args.model != "demo" else model.name_or_path), granularity=args.granularity,
                              locations_summary=locations.summary(), metrics={"before": before, "after": after},
                              objective=args.objective, repo_id=args.push_to_hub)
    if is_main_process():  # data parallel: every process holds the same deltas; process 0 writes them
        save_adapter(peft_model, out, card=card, extra={"before": before, "after": after, "best_step": result.best_step,
                                                        "edit": asdict(config)})
        print(json.dumps({"before": before, "after": after}, indent=1))
        print(f"adapter saved to {out}")
        if args.push_to_hub:
            print(push_adapter(out, args.push_to_hub))
    wait_for_everyone()
    return 0
