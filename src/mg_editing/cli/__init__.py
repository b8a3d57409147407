"""``mg-edit``: the command line.

Each subcommand lives in its own module of this package and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` (a callable taking
the parsed ``argparse.Namespace`` and returning an exit code). Modules are discovered, so
adding a command means adding one file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from mg_editing import __version__


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mg-edit",
        description="Measure (CodeGenBias, FB-Score) and remove (MG-Editing) gender bias in code LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"mg-editing {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status = int(args.func(args) or 0)
    except (UserError, ValueError, OSError, KeyError) as err:
        # What the library and transformers raise for bad input (unknown split, missing file
        # or model id, unknown module, not a causal LM): one line, no traceback.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"mg-edit {args.command}: error: {message}", file=sys.stderr)
        return 2
    # Under torchrun/accelerate launch: a clean teardown of the process group, or a rank can
    # abort at interpreter exit after finishing its work (only after success: on an error the
    # other ranks may never reach the barrier).
    from mg_editing.distributed import shutdown

    shutdown()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
