"""``mg-edit dataset build|push``: write and upload the CodeGenBias Hub dataset repo."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("dataset", help="build or push the CodeGenBias Hub dataset repo")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="write parquet splits + dataset card")
    build.add_argument("--out", default="hub_dataset/codegenbias", help="output folder (default: %(default)s)")
    build.add_argument("--seed", type=int, default=None, help="split seed (default: the recorded one)")
    build.set_defaults(func=_build)
    push = actions.add_parser("push", help="upload the built folder to the Hub")
    push.add_argument("repo_id", help="e.g. your-name/codegenbias")
    push.add_argument("--folder", default="hub_dataset/codegenbias")
    push.add_argument("--private", action="store_true")
    push.set_defaults(func=_push)


def _build(args: argparse.Namespace) -> int:
    from mg_editing.data import SPLIT_SEED, write_hub_dataset

    out = write_hub_dataset(args.out, seed=SPLIT_SEED if args.seed is None else args.seed)
    print(out)
    return 0


def _push(args: argparse.Namespace) -> int:
    from mg_editing.data import push_hub_dataset

    print(push_hub_dataset(args.repo_id, args.folder, private=args.private))
    return 0
