"""The editing loop under accelerate: gradient accumulation, checkpointing, mixed precision,
repeated calls in one process, and two processes (``torchrun``, gloo on CPU) against one.

Run as a script (``torchrun ... tests/test_edit_accelerate.py OUT``) this file is the worker of
the two-process test: every process edits the same tiny model and saves its deltas and history.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from conftest import make_model, make_tokenizer
from mg_editing import Locations, MGEditConfig
from mg_editing.architecture import get_architecture
from mg_editing.data import load_codegenbias
from mg_editing.edit import EditConfig, edit

TRAIN = load_codegenbias("train").select(range(0, 555, 37))
DEV = load_codegenbias("dev").select(range(0, 277, 40))
RECOVERY = ["def add(a, b):\n    return a + b\n", "def neg(x):\n    return -x\n", "for i in range(3):\n    print(i)\n"]

# The two-process test runs these in both processes and in this one, then compares.
DDP_RUNS = {
    # an odd batch (parts of 2 and 3 prompts) and an odd recovery batch (1 and 2 texts)
    "plain": dict(steps=3, batch_size=5, recovery_batch_size=3, eval_every=1, lr=5e-3, patience=None),
    # two micro-batches per update under DDP's no_sync, with checkpointed layers
    "accumulate_checkpoint": dict(steps=2, batch_size=4, gradient_accumulation_steps=2, gradient_checkpointing=True,
                                  recovery_batch_size=2, eval_every=1, lr=5e-3, patience=None),
    # bf16 autocast: DDP's wrapped model, and the caller's model left without the autocast wrapper
    "bf16": dict(steps=2, batch_size=4, mixed_precision="bf16", recovery_batch_size=2, eval_every=1, lr=5e-3, patience=None),
}
# Max |delta difference| between two processes and one. bf16 rounds differently when a batch is
# split, and Adam's first steps are about +-lr wherever a gradient is near zero, so there only the
# history is compared (to 1e-2).
TOLERANCE = {"plain": 1e-5, "accumulate_checkpoint": 1e-5, "bf16": None}


def _peft_model(granularity: str = "layer", family: str = "llama"):
    tok = make_tokenizer()
    model = make_model(family, len(tok))
    arch = get_architecture(model)
    if granularity == "row":
        name = sorted(arch.weight_modules(2))[-1]
        locs = Locations("row", modules=[name], layer=2, rows={name: torch.arange(4)})
    else:
        locs = Locations(granularity, modules=sorted(arch.weight_modules(1)), layer=1)
    return get_peft_model(model, MGEditConfig(granularity=granularity, locations=locs)), tok


def _deltas(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def _run(name: str, history_path=None, with_model: bool = False):
    peft_model, tok = _peft_model()
    result = edit(peft_model, tok, TRAIN, dev_dataset=DEV, recovery_texts=RECOVERY, history_path=history_path,
                  progress=False, **DDP_RUNS[name])
    return (result, _deltas(peft_model), peft_model) if with_model else (result, _deltas(peft_model))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# -- one process ------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError, match="unknown mixed_precision 'fp8'"):
        EditConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be at least 1"):
        EditConfig(gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be an integer"):
        EditConfig(gradient_accumulation_steps=1.5)
    with pytest.raises(ValueError, match="gradient_checkpointing must be True or False"):
        EditConfig(gradient_checkpointing="yes")
    config = EditConfig()
    assert (config.mixed_precision, config.gradient_accumulation_steps, config.gradient_checkpointing) == ("no", 1, False)


def test_accumulation_equals_the_larger_batch():
    """Two micro-batches of 4 per update = one batch of 8 (same prompts, same mean gradient)."""
    common = dict(steps=3, lr=2e-2, recovery_weight=0.0, progress=False)
    a, tok = _peft_model()
    ra = edit(a, tok, TRAIN, batch_size=8, **common)
    b, _ = _peft_model()
    rb = edit(b, tok, TRAIN, batch_size=4, gradient_accumulation_steps=2, **common)
    assert [h["step"] for h in rb.history] == [1, 2, 3]
    assert _max_diff(_deltas(a), _deltas(b)) < 1e-6
    assert [h["loss"] for h in ra.history] == pytest.approx([h["loss"] for h in rb.history], abs=1e-6)


def test_gradient_checkpointing_same_deltas_and_model_left_as_found():
    a, tok = _peft_model("layer")
    edit(a, tok, TRAIN, steps=3, batch_size=4, lr=2e-2, recovery_texts=RECOVERY, progress=False)
    b, _ = _peft_model("layer")
    base = b.get_base_model()
    arch = get_architecture(base)
    modes = [m.training for m in b.modules()]
    # layer 2 lies between the edited layer 1 and the loss, so its backward replays it (as far as
    # needed: its first module, at least)
    calls = []
    hook = base.get_submodule(arch.layer_name(2)).input_layernorm.register_forward_hook(lambda *_: calls.append(1))
    try:
        edit(b, tok, TRAIN, steps=3, batch_size=4, lr=2e-2, recovery_texts=RECOVERY, progress=False, gradient_checkpointing=True)
    finally:
        hook.remove()
    assert _max_diff(_deltas(a), _deltas(b)) < 1e-5
    # the layer really was recomputed in the backward pass: 2 forwards per step (pronouns,
    # recovery), then 2 replays
    assert len(calls) == 3 * 4, calls
    assert not base.is_activation_checkpointing
    assert not getattr(base, "_require_grads_hooks", None)
    assert [m.training for m in b.modules()] == modes


def test_bf16_autocast_on_cpu():
    peft_model, tok = _peft_model("module")
    base_before = {k: v.clone() for k, v in peft_model.get_base_model().state_dict().items() if "mg_edit" not in k}
    before = _deltas(peft_model)
    result = edit(peft_model, tok, TRAIN, steps=2, batch_size=4, lr=2e-2, recovery_texts=RECOVERY, progress=False, mixed_precision="bf16")
    after = _deltas(peft_model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert _max_diff(before, after) > 0
    assert all(v.dtype == torch.float32 for v in after.values())  # master weights stay fp32
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    base_after = {k: v for k, v in peft_model.get_base_model().state_dict().items() if "mg_edit" not in k}
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[k], base_before[k]) for k in base_before)
    # the model is left without accelerate's autocast wrapper: a plain forward is fp32
    ids = torch.tensor([[1, 2, 3]])
    assert peft_model(input_ids=ids).logits.dtype == torch.float32


def test_fp16_on_cpu_is_refused_clearly():
    peft_model, tok = _peft_model("row")
    before = _deltas(peft_model)
    with pytest.raises(ValueError, match="fp16.*needs a GPU.*bf16"):
        edit(peft_model, tok, TRAIN, steps=1, batch_size=4, recovery_texts=RECOVERY, progress=False, mixed_precision="fp16")
    assert _max_diff(before, _deltas(peft_model)) == 0


def test_repeated_edits_with_different_settings_in_one_process():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    runs = []
    for mixed_precision in ("no", "bf16", "no", "bf16"):
        peft_model, tok = _peft_model("row")
        edit(peft_model, tok, TRAIN, steps=1, batch_size=4, recovery_texts=RECOVERY, progress=False, mixed_precision=mixed_precision)
        runs.append(_deltas(peft_model))
    assert _max_diff(runs[0], runs[2]) == 0 and _max_diff(runs[1], runs[3]) == 0
    # an Accelerator the caller made keeps its own settings across an edit with other ones
    mine = Accelerator(mixed_precision="no")
    peft_model, tok = _peft_model("row")
    edit(peft_model, tok, TRAIN, steps=1, batch_size=4, recovery_texts=RECOVERY, progress=False, mixed_precision="bf16")
    assert mine.mixed_precision == "no" and AcceleratorState().mixed_precision == "no"
    AcceleratorState._reset_state()


@pytest.mark.parametrize("module", ["mg_editing.edit", "mg_editing.cli.edit"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# -- the command line -------------------------------------------------------------------------
def test_edit_command_options(tmp_path, capsys):
    import json

    from conftest import save_tiny_model
    from mg_editing.cli import build_parser, main

    parser = build_parser()
    for bad in (["--mixed-precision", "fp8"], ["--gradient-accumulation-steps", "0"], ["--dtype", "fp64"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["edit", "--model", "m", "--granularity", "full", "--out", "o", *bad])
    capsys.readouterr()
    help_text = " ".join(parser._subparsers._group_actions[0].choices["edit"].format_help().split())
    assert "micro-batches per optimizer update" in help_text and "{fp32,fp16,bf16}" in help_text

    model_dir = save_tiny_model(tmp_path / "tiny", "llama")
    out = tmp_path / "adapter"
    assert main(["edit", "--model", str(model_dir), "--granularity", "full", "--out", str(out), "--dtype", "fp32",
                 "--steps", "2", "--batch-size", "4", "--recovery-weight", "0", "--mixed-precision", "bf16",
                 "--gradient-accumulation-steps", "2", "--gradient-checkpointing"]) == 0
    saved = json.loads((out / "mg_editing.json").read_text())
    assert saved["edit"]["mixed_precision"] == "bf16" and saved["edit"]["gradient_accumulation_steps"] == 2
    assert saved["edit"]["gradient_checkpointing"] is True
    history = json.loads((out / "edit_history.json").read_text())
    assert history["config"] == saved["edit"] and (out / "adapter_config.json").is_file()


# -- two processes ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(out: Path) -> None:
    from mg_editing import distributed

    rank = distributed.process_index()
    for name in DDP_RUNS:
        result, deltas, peft_model = _run(name, history_path=out / f"{name}_history_rank{rank}.json", with_model=True)
        logits = peft_model(input_ids=torch.tensor([[1, 2, 3]])).logits
        torch.save({"deltas": deltas, "history": result.history, "best_step": result.best_step, "world": distributed.world_size(),
                    "logits_dtype": str(logits.dtype), "wrapped": "_original_forward" in peft_model.__dict__},
                   out / f"{name}_rank{rank}.pt")
        distributed.wait_for_everyone()
    distributed.shutdown()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, str(tmp_path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    launched = time.perf_counter() - start
    report = []
    for name in DDP_RUNS:
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(2)]
        assert [r["world"] for r in ranks] == [2, 2]
        # identical on every process: deltas bit for bit, history value for value
        assert _max_diff(ranks[0]["deltas"], ranks[1]["deltas"]) == 0
        assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["best_step"] == ranks[1]["best_step"]
        # only process 0 writes the history
        assert (tmp_path / f"{name}_history_rank0.json").is_file() and not (tmp_path / f"{name}_history_rank1.json").exists()
        assert [(r["logits_dtype"], r["wrapped"]) for r in ranks] == [("torch.float32", False)] * 2
        # and the same as one process on the same global batches
        single, single_deltas = _run(name)
        diff = _max_diff(ranks[0]["deltas"], single_deltas)
        report.append(f"{name}: max |delta(2 proc) - delta(1 proc)| = {diff:.3g}")
        assert TOLERANCE[name] is None or diff < TOLERANCE[name], report
        assert [h["step"] for h in ranks[0]["history"]] == [h["step"] for h in single.history]
        for two, one in zip(ranks[0]["history"], single.history):
            assert two.keys() == one.keys()
            for key in two:
                assert two[key] == pytest.approx(one[key], abs=TOLERANCE[name] or 1e-2), (name, key, two, one)
    print(f"torchrun took {launched:.1f}s; " + "; ".join(report))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
