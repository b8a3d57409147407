"""``mg-edit score``: FB-Score of a causal LM on CodeGenBias, in the layout of Table III."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mg_editing.cli._model_args import add_model_arguments, load_kwargs


def register(subparsers) -> None:
    parser = subparsers.add_parser("score", help="FB-Score of a model on CodeGenBias (Table III layout)")
    add_model_arguments(parser)
    parser.add_argument("--split", default="test", help="train, dev, test, all, or joins like train+dev (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N prompts (quick look)")
    parser.add_argument("--out", default=None, help="JSON file for the results (default: fb_score_<split>.json)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mg_editing.data import load_codegenbias
    from mg_editing.models import load_model_and_tokenizer
    from mg_editing.scoring import score_dataset

    dataset = load_codegenbias(args.split, limit=args.limit)
    from mg_editing.distributed import is_main_process

    model, tokenizer = load_model_and_tokenizer(args.model, **load_kwargs(args))
    result = score_dataset(model, tokenizer, dataset, batch_size=args.batch_size, progress=True)
    if not is_main_process():  # data parallel: every process holds the result; process 0 reports it
        return 0
    print(result.table(args.model))
    print(f"normalized variant: {result.metrics['fb_score_normalized']:.4f}   prompts: {result.metrics['n']}")
    out = Path(args.out or f"fb_score_{args.split.replace('+', '_')}.json")
    payload = {"model": args.model, "split": args.split, **{k: v for k, v in result.to_dict().items() if k != "per_prompt"}}
    payload["per_prompt_fb"] = result.metrics["per_prompt"]
    payload["ids"] = list(dataset["id"])
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
