"""Row + neuron locating benchmark: naive full-model backward vs ``mg_editing.locate``.

    python benchmarks/bench_locate.py [--n-prompts 16] [--n-layers 20] [--layer -1] [--small]

Same model, same prompts, same run. Both locate rows (Eq. 12, top-k per prompt, union) and
then neurons (Eq. 13) in one module of a CodeGen-350M-shaped random-init model
(``--small``: 4 layers x 256; ``--n-layers`` shortens the 350M shape when 20 layers are too
slow for the machine).

* naive: for every prompt and every pronoun, a full forward + ``loss.backward()`` with all
  parameters requiring grad (the textbook way), batch 1; the module's ``.grad`` is read, and
  the per-prompt ``|G_he - G_she|`` matrices are kept until the rows are known (one pass).
* implementation: :func:`mg_editing.locate.locate_rows` + :func:`~mg_editing.locate.locate_neurons`
  (batched, no parameter requiring grad, forward stopped after the last block, closed-form
  per-prompt gradients from hooks; two passes).

Peak memory: a sampling thread reads the process RSS (``/proc/self/statm`` via psutil) every
5 ms; the number reported is the peak RSS during a method minus the RSS just before it. torch's
CPU allocator is not seen by ``tracemalloc`` (it tracks Python's allocator only), so RSS is the
honest measure; it is approximate (sampling, allocator caching) and includes freed-then-reused
pages, which favours neither method.
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch
from transformers import AutoModelForCausalLM, CodeGenConfig

from _common import CODEGEN_350M, CODEGEN_SMALL, tokenizer
from mg_editing.data import load_codegenbias
from mg_editing.locate import aggregate_topk, locate_neurons, locate_rows
from mg_editing.scoring import encode_targets


class PeakRSS:
    """Peak resident set size above the starting point, sampled in a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.process = interval, psutil.Process()

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def naive_locate(model, targets, module_name, top_k, neuron_top_k):
    """Eqs. 12-13 the textbook way: one prompt, one pronoun, one full backward at a time."""
    module = model.get_submodule(module_name)
    for p in model.parameters():
        p.requires_grad_(True)
    cosines, diffs = [], []
    for per_prompt in targets:
        grads = []
        for t in per_prompt:
            model.zero_grad(set_to_none=True)
            ids = torch.tensor([list(t.context) + list(t.target[:-1])])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            loss = -sum(logp[len(t.context) - 1 + j, tok] for j, tok in enumerate(t.target))
            loss.backward()
            grads.append(module.weight.grad.detach().clone())  # Linear: out x in
        cosines.append(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=1))
        diffs.append((grads[0] - grads[1]).abs())
    model.zero_grad(set_to_none=True)
    cos = torch.stack(cosines)
    rows, _ = aggregate_topk(cos.topk(top_k, dim=1).indices, cos.shape[1], "union")
    n_in = diffs[0].shape[1]
    flat = torch.stack([d[rows].reshape(-1).topk(neuron_top_k).indices for d in diffs])
    selected, _ = aggregate_topk(flat, rows.numel() * n_in, "union")
    return rows, torch.stack([rows[selected // n_in], selected % n_in])


def fast_locate(model, targets, module_name, top_k, neuron_top_k, batch_size):
    rows = locate_rows(model, targets, module_name, top_k=top_k, batch_size=batch_size)
    neurons = locate_neurons(model, targets, module_name, rows.rows, top_k=neuron_top_k, batch_size=batch_size)
    return rows.rows, neurons.neurons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--small", action="store_true", help="4 layers x 256 instead of the 350M shape")
    parser.add_argument("--n-layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--layer", type=int, default=-1, help="block of the located module (default: last, as the paper)")
    parser.add_argument("--module", default="mlp.fc_out", help="module inside the block (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--neuron-top-k", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    shape = dict(CODEGEN_SMALL if args.small else CODEGEN_350M)
    if args.n_layers:
        shape["n_layer"] = args.n_layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CodeGenConfig(**shape, bos_token_id=0, eos_token_id=0)).eval()
    tok = tokenizer()
    rows_ = load_codegenbias("train+dev")
    prompts = rows_.select(range(0, len(rows_), max(1, len(rows_) // args.n_prompts)))["prompt"][: args.n_prompts]
    targets = encode_targets(tok, prompts)
    layer = args.layer % shape["n_layer"]
    module_name = f"transformer.h.{layer}.{args.module}"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: CodeGen-shaped {shape['n_layer']} layers x {shape['n_embd']}, {n_params / 1e6:.0f}M params, "
          f"{torch.get_num_threads()} threads; {len(prompts)} prompts of ~{len(targets[0][0].context)} tokens; "
          f"module {module_name}")

    with PeakRSS() as mem_fast:
        start = time.perf_counter()
        rows_f, neurons_f = fast_locate(model, targets, module_name, args.top_k, args.neuron_top_k, args.batch_size)
        t_fast = time.perf_counter() - start
    with PeakRSS() as mem_naive:
        start = time.perf_counter()
        rows_n, neurons_n = naive_locate(model, targets, module_name, args.top_k, args.neuron_top_k)
        t_naive = time.perf_counter() - start

    same_rows = set(rows_f.tolist()) == set(rows_n.tolist())
    overlap = len(set(zip(*neurons_f.tolist())) & set(zip(*neurons_n.tolist()))) / max(1, neurons_n.shape[1])
    print(f"{'method':<40}{'seconds':>10}{'prompts/s':>11}{'peak RSS +MiB':>15}")
    print(f"{'naive (full backward, 1 prompt x pronoun)':<40}{t_naive:>10.1f}{len(prompts) / t_naive:>11.3f}{mem_naive.delta_mib:>15.0f}")
    print(f"{'mg_editing.locate (batched, closed form)':<40}{t_fast:>10.1f}{len(prompts) / t_fast:>11.3f}{mem_fast.delta_mib:>15.0f}")
    print(f"speed-up: {t_naive / t_fast:.2f}x; rows: {rows_f.numel()} (same set as naive: {same_rows}); "
          f"neurons: {neurons_f.shape[1]} ({overlap:.0%} shared with naive)")


if __name__ == "__main__":
    main()
