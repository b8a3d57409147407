"""Data-parallel scoring: 1 process vs 2 processes (torchrun, gloo), same model, same prompts.

    python benchmarks/bench_distributed.py [--n-prompts 64] [--repeats 3] [--batch-size 16] [--full]

Launches, in one run and interleaved round by round, the scorer under
``torchrun --nproc_per_node N`` for three set-ups on this machine:

* 1 process x 1 thread  (the unit data parallelism scales),
* 1 process x 2 threads (what one process gets from both cores),
* 2 processes x 1 thread (data parallel: each scores half of the prompts, results gathered).

Each worker builds the same random-init CodeGen stand-in (``--full``: the 350M shape; default
the small 4 x 256 one), warms up, then times ``pronoun_probabilities`` between two barriers.
Prints median seconds, prompts/s, and the ratios, and checks that the 2-process scores equal
the 1-process ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUPS = (("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1))


def worker(args: argparse.Namespace) -> None:
    import torch

    from _common import codegen_stand_in, tokenizer
    from mg_editing.data import load_codegenbias
    from mg_editing.distributed import is_main_process, shutdown, wait_for_everyone, world_size
    from mg_editing.scoring import pronoun_probabilities

    torch.set_num_threads(args.threads)
    tok = tokenizer()
    model = codegen_stand_in(small=not args.full)
    test = load_codegenbias("test")
    prompts = list(test.select(range(0, len(test), len(test) // args.n_prompts))["prompt"][: args.n_prompts])
    with torch.inference_mode():
        pronoun_probabilities(model, tok, prompts[: args.batch_size], batch_size=args.batch_size)  # warm-up
        wait_for_everyone()
        start = time.perf_counter()
        probs = pronoun_probabilities(model, tok, prompts, batch_size=args.batch_size)
        wait_for_everyone()
        seconds = time.perf_counter() - start
    if is_main_process():
        torch.save(probs, args.out + ".pt")
        Path(args.out).write_text(json.dumps({"seconds": seconds, "world_size": world_size(), "n": len(prompts)}))
    shutdown()


def launch(args: argparse.Namespace, nproc: int, threads: int, out: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--worker", "--threads", str(threads), "--out", out, "--n-prompts", str(args.n_prompts),
           "--batch-size", str(args.batch_size)] + (["--full"] if args.full else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--full", action="store_true", help="the CodeGen-350M shape (slow on 2 cores)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    times: dict[str, list[float]] = {name: [] for name, _, _ in SETUPS}
    probs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for name, nproc, threads in SETUPS:
                out = f"{tmp}/{nproc}x{threads}-{round_}.json"
                result = launch(args, nproc, threads, out)
                assert result["world_size"] == nproc
                times[name].append(result["seconds"])
                probs[name] = torch.load(out + ".pt")
    n = args.n_prompts
    print(f"model: CodeGen {'350M' if args.full else 'small (4 x 256)'}-shaped stand-in; {n} prompts; "
          f"{os.cpu_count()} CPUs; median of {args.repeats} interleaved rounds")
    print(f"{'set-up':<26}{'median s':>10}{'prompts/s':>12}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        print(f"{name:<26}{seconds:>10.2f}{n / seconds:>12.2f}")
    base, threaded, parallel = (medians[name] for name, _, _ in SETUPS)
    print(f"2 processes vs 1 process x 1 thread:  {base / parallel:.2f}x")
    print(f"2 processes vs 1 process x 2 threads: {threaded / parallel:.2f}x")
    diff = float((probs[SETUPS[2][0]] - probs[SETUPS[0][0]]).abs().max())
    print(f"max |p(2 processes) - p(1 process)| = {diff:.1e}")


if __name__ == "__main__":
    main()
