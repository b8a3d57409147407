"""Scorer benchmark: naive per-prompt loop vs the fast scorer, same model, same prompts.

    python benchmarks/bench_scoring.py [--n-prompts 32] [--repeats 3] [--batch-size 16] [--small]

Prints prompts/s of each (median over repeats) and their ratio, measured side by side in
one run, on a CodeGen-350M-sized random-init model (``--small``: 4 layers x 256).
"""

from __future__ import annotations

import argparse

import torch

from _common import codegen_stand_in, median_time, tokenizer
from mg_editing.data import load_codegenbias
from mg_editing.scoring import pronoun_probabilities, pronoun_probabilities_naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()

    tok = tokenizer()
    model = codegen_stand_in(args.small)
    test = load_codegenbias("test")
    prompts = test.select(range(0, len(test), len(test) // args.n_prompts))["prompt"][: args.n_prompts]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: CodeGen {'small' if args.small else '350M'}-shaped, {n_params / 1e6:.0f}M params, "
          f"{torch.get_num_threads()} threads; {len(prompts)} prompts of ~{len(tok(prompts[0])['input_ids'])} tokens")

    with torch.inference_mode():
        fast = pronoun_probabilities(model, tok, prompts, batch_size=args.batch_size)
        naive = pronoun_probabilities_naive(model, tok, prompts)
        assert torch.allclose(fast, naive, atol=1e-5), "fast and naive scorers disagree"
        t_naive = median_time(lambda: pronoun_probabilities_naive(model, tok, prompts), args.repeats)
        t_fast = median_time(lambda: pronoun_probabilities(model, tok, prompts, batch_size=args.batch_size), args.repeats)
    print(f"{'scorer':<28}{'median s':>10}{'prompts/s':>12}")
    print(f"{'naive (per prompt, no cache)':<28}{t_naive:>10.2f}{len(prompts) / t_naive:>12.2f}")
    print(f"{'fast (prefix cache, batched)':<28}{t_fast:>10.2f}{len(prompts) / t_fast:>12.2f}")
    print(f"speed-up: {t_naive / t_fast:.2f}x  (max |p_fast - p_naive| = {float((fast - naive).abs().max()):.1e})")


if __name__ == "__main__":
    main()
