"""Forward time of a base model vs the same model with an MG-Editing row / neuron adapter (unmerged).

The model is CodeGen-350M-mono's real configuration with random weights (cost depends on shape,
not on weight values), or a small CodeGen with ``--small``. The row adapter holds 120 located
rows of one ``fc_out`` (1024 x 4096), the neuron adapter 10k neurons inside those rows, as in
the paper's row/neuron results. All three are timed in the same run, interleaved round by round
(base = adapters disabled), and the medians and ratios are printed. Target: overhead <= 1.2x.

    python benchmarks/bench_adapter_forward.py [--small] [--device cuda] [--seq 256] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, CodeGenConfig

import mg_editing  # noqa: F401  registers MG_EDIT
from mg_editing.locations import Locations
from mg_editing.tuner import MGEditConfig

CODEGEN_350M = dict(n_layer=20, n_embd=1024, n_head=16, rotary_dim=32, vocab_size=51200, n_positions=2048, n_ctx=2048)
SMALL = dict(n_layer=4, n_embd=256, n_head=4, rotary_dim=16, vocab_size=8192, n_positions=1024, n_ctx=1024, bos_token_id=0, eos_token_id=0)


def build(small: bool, device: str, dtype: torch.dtype) -> AutoModelForCausalLM:
    torch.manual_seed(0)
    config = CodeGenConfig(**(SMALL if small else CODEGEN_350M))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def make_locations(model, n_rows: int, n_neurons: int) -> Locations:
    layer = model.config.n_layer // 2
    name = f"transformer.h.{layer}.mlp.fc_out"
    out_f, in_f = model.get_submodule(name).weight.shape
    gen = torch.Generator().manual_seed(0)
    rows = torch.randperm(out_f, generator=gen)[: min(n_rows, out_f)].sort().values
    pairs = torch.stack([rows.repeat_interleave(in_f), torch.arange(in_f).repeat(len(rows))])
    neurons = pairs[:, torch.randperm(pairs.shape[1], generator=gen)[: min(n_neurons, pairs.shape[1])]]
    return Locations("neuron", modules=[name], layer=layer, rows={name: rows}, neurons={name: neurons})


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small CodeGen instead of CodeGen-350M dims")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=120)
    parser.add_argument("--neurons", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    model = build(args.small, args.device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)
    locs = make_locations(model, args.rows, args.neurons)

    def forward():
        with torch.inference_mode():
            model(x, use_cache=False)

    # base model before any wrapping, as a check on the "adapters disabled" numbers below
    for _ in range(args.warmup):
        forward()
    pure_base = [timed(forward, args.device) for _ in range(args.repeats)]

    model = get_peft_model(model, MGEditConfig(granularity="row", locations=locs.coarsen("row")), adapter_name="row")
    model.add_adapter("neuron", MGEditConfig(granularity="neuron", locations=locs))
    with torch.no_grad():  # non-zero deltas, so nothing is skipped
        for name, p in model.named_parameters():
            if "mg_edit_delta" in name:
                p.normal_(0, 0.01)

    times: dict[str, list[float]] = {"base": [], "row": [], "neuron": []}
    for _ in range(args.warmup):
        for adapter in ("row", "neuron"):
            model.set_adapter(adapter)
            forward()
    order = ["base", "row", "neuron"]
    for r in range(args.repeats):  # interleaved rounds in rotating order: drift and load hit all three alike
        for kind in order[r % 3 :] + order[: r % 3]:
            if kind == "base":
                with model.disable_adapter():
                    times["base"].append(timed(forward, args.device))
            else:
                model.set_adapter(kind)
                times[kind].append(timed(forward, args.device))

    # the located layer alone: the adapter's own cost without the rest of the model's noise
    layer = model.get_base_model().get_submodule(locs.modules[0])
    h = torch.randn(args.batch, args.seq, layer.in_features, device=args.device, dtype=dtype)
    layer_times: dict[str, list[float]] = {"base": [], "row": [], "neuron": []}

    def layer_forward():
        with torch.inference_mode():
            for _ in range(10):
                layer(h)

    for r in range(args.repeats):
        for kind in order[r % 3 :] + order[: r % 3]:
            if kind == "base":
                with model.disable_adapter():
                    layer_times["base"].append(timed(layer_forward, args.device) / 10)
            else:
                model.set_adapter(kind)
                layer_times[kind].append(timed(layer_forward, args.device) / 10)

    med = {k: statistics.median(v) for k, v in times.items()}
    med["pure_base"] = statistics.median(pure_base)
    size = "small CodeGen" if args.small else "CodeGen-350M dims"
    print(
        f"{size}: {n_params / 1e6:.1f}M params, {args.device} {args.dtype}, batch {args.batch} x {args.seq} tokens, "
        f"threads {torch.get_num_threads()}, median of {args.repeats}"
    )
    print(f"  base (unwrapped)        {1e3 * med['pure_base']:9.2f} ms")
    print(f"  base (adapter disabled) {1e3 * med['base']:9.2f} ms")
    for kind, count in (("row", f"{locs.num_rows} rows"), ("neuron", f"{locs.num_neurons} neurons")):
        ratio = med[kind] / med["base"]
        flag = "ok" if ratio <= 1.2 else "OVER 1.2x"
        print(f"  {kind:<6} adapter ({count:>13}) {1e3 * med[kind]:9.2f} ms   ratio {ratio:.3f}x  [{flag}]")
    lmed = {k: statistics.median(v) for k, v in layer_times.items()}
    print(f"  located layer alone ({locs.modules[0]}, {layer.out_features} x {layer.in_features}):")
    print(f"    base {1e3 * lmed['base']:.3f} ms, row {1e3 * lmed['row']:.3f} ms ({lmed['row'] / lmed['base']:.3f}x), "
          f"neuron {1e3 * lmed['neuron']:.3f} ms ({lmed['neuron'] / lmed['base']:.3f}x)")
    med.update({f"layer_{k}": v for k, v in lmed.items()})
    return med


if __name__ == "__main__":
    main()
