"""Shared pieces of the benchmarks: real-size random-init stand-ins and an offline tokenizer."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, CodeGenConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_tokenizer  # noqa: E402  (the tests' offline BPE tokenizer)

#: CodeGen-350M-mono's real configuration (random weights: cost depends on shape only).
CODEGEN_350M = dict(n_layer=20, n_embd=1024, n_head=16, rotary_dim=32, n_positions=2048, n_ctx=2048, vocab_size=51200)
#: A small stand-in for quick runs (--small).
CODEGEN_SMALL = dict(n_layer=4, n_embd=256, n_head=8, rotary_dim=16, n_positions=2048, n_ctx=2048, vocab_size=51200)


def codegen_stand_in(small: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = CodeGenConfig(**(CODEGEN_SMALL if small else CODEGEN_350M), bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()


def tokenizer():
    return make_tokenizer(vocab_size=2000)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
