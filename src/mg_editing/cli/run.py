"""``mg-edit run`` and ``mg-edit demo``: the whole pipeline, resumable, into one folder."""

from __future__ import annotations

import argparse

from mg_editing.cli._model_args import add_model_arguments, add_training_arguments, load_kwargs, training_options
from mg_editing.locations import GRANULARITIES

#: Settings of ``mg-edit demo``, sized to finish on a 2-core CPU machine: HumanEval on the
#: first 48 held-out problems (17-64) with 10 samples each and short completions, and a
#: shorter edit. Every number is recorded in the report's settings.
DEMO_SETTINGS = dict(n_samples=10, max_new_tokens=64, humaneval_limit=48, kl_prompts=32)
DEMO_EDIT = dict(steps=120, eval_every=20, patience=3)


def _granularities(text: str) -> tuple[str, ...]:
    names = GRANULARITIES if text == "all" else tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in GRANULARITIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown granularity {unknown[0] if unknown else text!r}; choose from all or {', '.join(GRANULARITIES)}")
    return names


def _add_common(parser: argparse.ArgumentParser, *, demo: bool) -> None:
    parser.add_argument("--out", default="runs/demo" if demo else None, required=not demo, help="output folder; rerun with the same folder to resume")
    parser.add_argument("--granularities", type=_granularities, default=GRANULARITIES, help="'all' or a comma list, e.g. row,neuron")
    parser.add_argument("--objective", choices=("fb", "paper"), default="fb", help="editing objective (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="editing steps per granularity")
    parser.add_argument("--lr", type=float, default=None, help="editing learning rate")
    parser.add_argument("--n-samples", type=int, default=None, help="HumanEval samples per problem for pass@k")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--humaneval-limit", type=int, default=None, help="only the first N held-out problems")
    parser.add_argument("--score-stride", type=int, default=None, help="score every n-th train/test prompt (quick look; default 1 = all)")
    parser.add_argument("--locate-split", default=None, help="CodeGenBias split(s) to locate on (default: train+dev)")
    parser.add_argument("--seed", type=int, default=0)
    add_model_arguments(parser, model=False)
    add_training_arguments(parser)


def register(subparsers) -> None:
    run = subparsers.add_parser("run", help="score, locate, edit every granularity, evaluate and report")
    run.add_argument("--model", required=True, help="Hub id, local path, or 'demo'")
    _add_common(run, demo=False)
    run.add_argument("--allow-code-execution", action="store_true",
                     help="run model-written HumanEval code in the sandbox for pass@k (or set MG_EDIT_ALLOW_CODE_EVAL=1)")
    run.set_defaults(func=_run)
    demo = subparsers.add_parser("demo", help="`run` on the embedded demo model, sized for a laptop CPU")
    _add_common(demo, demo=True)
    demo.set_defaults(func=_demo)


def _settings(args: argparse.Namespace, allow: bool, defaults: dict, edit_defaults: dict | None = None):
    import os

    from mg_editing.edit import EditConfig
    from mg_editing.pipeline import RunSettings

    edit_overrides = dict(edit_defaults or {})
    edit_overrides.update({k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None})
    edit_config = EditConfig(objective=args.objective, seed=args.seed, **training_options(args), **edit_overrides)
    values = dict(defaults)
    for key in ("n_samples", "max_new_tokens", "humaneval_limit", "score_stride", "locate_split"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    allow = allow or os.environ.get("MG_EDIT_ALLOW_CODE_EVAL") == "1"
    return RunSettings(granularities=args.granularities, edit=edit_config, allow_code_execution=allow, seed=args.seed, **values)


def _run(args: argparse.Namespace) -> int:
    from mg_editing.pipeline import run_pipeline

    settings = _settings(args, args.allow_code_execution, {})
    if not settings.allow_code_execution:
        print("[mg-edit] HumanEval pass@k skipped: model-written code runs only with --allow-code-execution "
              "(or MG_EDIT_ALLOW_CODE_EVAL=1); execution-free locality is still reported.")
    paths = run_pipeline(args.model, args.out, settings, **load_kwargs(args))
    _print_report(paths)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mg_editing.pipeline import run_pipeline

    print("[mg-edit] demo: the demo model's HumanEval completions are executed in the sandbox "
          "(child process, time/memory limits, no network, temp dir): the demo opts in to code execution itself.")
    settings = _settings(args, True, DEMO_SETTINGS, DEMO_EDIT)
    paths = run_pipeline("demo", args.out, settings, **load_kwargs(args))
    _print_report(paths)
    return 0


def _print_report(paths: dict) -> None:
    from mg_editing.distributed import is_main_process

    if is_main_process():
        print(paths["markdown"].read_text())
