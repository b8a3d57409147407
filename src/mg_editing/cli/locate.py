"""``mg-edit locate``: the locating phase (layer, module, row, neuron) with its figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from mg_editing.cli._model_args import add_model_arguments, load_kwargs


def _min_frequency(text: str) -> float | int:
    """``0.5`` -> a fraction of the prompts; ``3`` -> a number of prompts."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def register(subparsers) -> None:
    from mg_editing.locate import AGGREGATIONS, LAYER_SELECTIONS, ROW_RANKINGS
    from mg_editing.locations import GRANULARITIES

    parser = subparsers.add_parser("locate", help="locate the parameters behind the bias (Locations + figures)")
    parser.add_argument("--model", default="demo", help="Hub id, local path, or 'demo' (default: %(default)s)")
    parser.add_argument("--granularity", default="row", choices=GRANULARITIES, help="(default: %(default)s)")
    parser.add_argument("--split", default="train+dev", help="CodeGenBias split(s) to locate with (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts (quick look)")
    parser.add_argument("--layer-selection", default="mode", choices=LAYER_SELECTIONS,
                        help="key layer: mode of the per-prompt argmax, or argmax of the mean (default: %(default)s)")
    parser.add_argument("--layer", type=int, default=None, help="skip layer locating and use this key layer")
    parser.add_argument("--modules", nargs="+", default=None, help="skip module locating and use these modules (full names)")
    parser.add_argument("--n-modules", type=int, default=2, help="modules kept (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=10, help="rows kept per prompt (default: %(default)s)")
    parser.add_argument("--neuron-top-k", type=int, default=100, help="neurons kept per prompt (default: %(default)s)")
    parser.add_argument("--aggregate", default="union", choices=AGGREGATIONS, help="(default: %(default)s)")
    parser.add_argument("--min-frequency", type=_min_frequency, default=0.5,
                        help="for --aggregate frequency: a fraction (0.5) or a prompt count (3) (default: %(default)s)")
    parser.add_argument("--row-ranking", default="largest", choices=ROW_RANKINGS,
                        help="which gradient cosines mark a bias row (default: %(default)s, as the paper)")
    parser.add_argument("--batch-size", type=int, default=8)
    add_model_arguments(parser, model=False)
    parser.add_argument("--no-plots", action="store_true", help="do not write the figures")
    parser.add_argument("--out", required=True, help="output folder for locations.json/.safetensors and figures")
    parser.set_defaults(func=_run)


def summary(locations) -> str:
    """A few human-readable lines about what was located."""
    meta = locations.meta
    lines = [f"model: {meta.get('model')}   prompts: {meta.get('n_prompts')}   granularity: {locations.granularity}"]
    if locations.layer is not None:
        counts = locations.scores.get("layer_argmax_counts")
        extra = f" (argmax for {int(counts[locations.layer])} of {meta.get('n_prompts')} prompts)" if counts is not None else ""
        lines.append(f"key layer: {locations.layer} = {meta.get('layer_name')}{extra}")
    if locations.modules:
        lines.append(f"modules: {', '.join(locations.modules)}")
    for name, rows in locations.rows.items():
        lines.append(f"rows: {rows.numel()} in {name}; top row {meta.get('top_row')}")
    for name, neurons in locations.neurons.items():
        lines.append(f"neurons: {neurons.shape[1]} in {name}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from mg_editing.data import load_codegenbias
    from mg_editing.locate import locate
    from mg_editing.models import load_model_and_tokenizer

    dataset = load_codegenbias(args.split, limit=args.limit)
    from mg_editing.distributed import is_main_process

    model, tokenizer = load_model_and_tokenizer(args.model, **load_kwargs(args))
    locations = locate(
        model, tokenizer, dataset, args.granularity,
        layer_selection=args.layer_selection, layer=args.layer, modules=args.modules, n_modules=args.n_modules,
        top_k=args.top_k, neuron_top_k=args.neuron_top_k, aggregate=args.aggregate,
        min_frequency=args.min_frequency, row_ranking=args.row_ranking, batch_size=args.batch_size, progress=True,
    )
    locations.meta["split"] = args.split
    locations.meta["model"] = args.model
    if not is_main_process():  # data parallel: every process located the same; process 0 writes
        return 0
    out = Path(args.out)
    locations.save(out)
    print(summary(locations))
    print(f"wrote {out / 'locations.json'} and {out / 'locations.safetensors'}")
    if not args.no_plots:
        from mg_editing.plots import plot_locations

        for path in plot_locations(locations, out):
            print(f"wrote {path}")
    return 0
