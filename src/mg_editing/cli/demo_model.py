"""``mg-edit demo-model build``: train (or find in the cache) the offline demo model."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-model",
        help="build the small, deliberately biased CodeGen-architecture demo model (offline)",
        description=(
            "The demo model is a model organism: a small CodeGen-architecture LM trained here, "
            "offline and deterministically, on CodeGenBias-style functions whose pronoun follows "
            "the stereotype score, plus HumanEval and standard-library Python. `--model demo` "
            "resolves to it. It is not a claim about real models."
        ),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="train the demo model (about 3 minutes on 2 CPU cores) and print its directory",
        description="Train the demo model and print its directory on stdout; progress goes to stderr.",
    )
    build.add_argument("--out", metavar="DIR", default=None, help="where to save it (default: the cache under $MG_EDITING_CACHE or ~/.cache/mg_editing)")
    build.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    build.add_argument("--force", action="store_true", help="rebuild even if a complete build is already there")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _build(args: argparse.Namespace) -> int:
    from mg_editing.cli import UserError
    from mg_editing.demo_model import build_demo_model, demo_model_dir, is_built

    target = args.out if args.out is not None else demo_model_dir(args.seed)
    if is_built(target) and not args.force:
        print(f"demo model already built in {target} (--force rebuilds it)", file=sys.stderr)
        print(target)
        return 0
    try:
        path = build_demo_model(target, seed=args.seed, progress=not args.quiet, force=args.force)
    except FileExistsError as err:
        raise UserError(str(err)) from err
    print(path)
    return 0
