"""Data-parallel runs (issue 7): two CPU processes (torchrun, gloo) give what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model
from mg_editing import distributed

JOB = Path(__file__).parent / "scripts" / "distributed_job.py"


def _run_job(model_dir: Path, out: Path, nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MG_EDIT_ALLOW_CODE_EVAL": "1"}
    env.pop("WORLD_SIZE", None)
    if nproc == 1:
        cmd = [sys.executable, str(JOB), str(model_dir), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(JOB), str(model_dir), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    model_dir = save_tiny_model(tmp / "model", "codegen")
    return _run_job(model_dir, tmp / "one.pt", 1), _run_job(model_dir, tmp / "two.pt", 2)


@pytest.mark.slow
def test_two_processes_split_the_prompts(runs):
    one, two = runs
    assert one["world_size"] == 1 and one["blocks"] == [(0, 13)]
    assert two["world_size"] == 2 and two["blocks"] == [(0, 7), (7, 13)]


@pytest.mark.slow
def test_two_processes_score_like_one(runs):
    one, two = runs
    assert two["probs"].shape == one["probs"].shape == (13, 2)
    torch.testing.assert_close(two["probs"], one["probs"], rtol=0, atol=1e-6)
    assert abs(two["fb"] - one["fb"]) < 1e-6


@pytest.mark.slow
def test_two_processes_locate_like_one(runs):
    one, two = runs
    assert two["layer"] == one["layer"]
    assert two["modules"] == one["modules"]
    for kind in ("rows", "neurons"):
        assert two[kind].keys() == one[kind].keys()
        for name in one[kind]:
            assert torch.equal(two[kind][name], one[kind][name]), (kind, name)
    assert two["scores"].keys() == one["scores"].keys()
    for name, value in one["scores"].items():
        torch.testing.assert_close(two["scores"][name].double(), value.double(), rtol=1e-5, atol=1e-6, msg=name)
    assert two["meta"]["n_prompts"] == one["meta"]["n_prompts"] == 13


@pytest.mark.slow
def test_two_processes_generate_execute_and_evaluate_like_one(runs):
    one, two = runs
    assert two["completions"] == one["completions"]  # sampled: each batch has its own seed
    assert two["pass@1"] == one["pass@1"] == 1.0
    assert abs(two["nll"] - one["nll"]) < 1e-6


def test_single_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.is_distributed()
    assert distributed.world_size() == 1 and distributed.process_index() == 0 and distributed.is_main_process()
    assert distributed.shard_bounds(5) == (0, 5)
    assert distributed.local_part([1, 2, 3]) == [1, 2, 3]
    assert distributed.gather_list([1, 2]) == [1, 2]
    t = torch.arange(3.0)
    assert distributed.gather_tensor(t) is t and distributed.reduce_sum(t) is t
    distributed.shutdown()  # nothing initialised: nothing to do, no error


def test_shutdown_destroys_the_process_group(tmp_path):
    # A real gloo group (one rank, file rendezvous): shutdown leaves none behind, so the
    # interpreter never exits with gloo threads alive.
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert torch.distributed.is_initialized()
        distributed.shutdown()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("n, size, expected", [
    (13, 2, [(0, 7), (7, 13)]),
    (4, 3, [(0, 2), (2, 3), (3, 4)]),
    (1, 3, [(0, 1), (1, 1), (1, 1)]),
])
def test_blocks_are_contiguous_and_cover_everything(monkeypatch, n, size, expected):
    monkeypatch.setattr(distributed, "world_size", lambda: size)
    blocks = []
    for rank in range(size):
        monkeypatch.setattr(distributed, "process_index", lambda rank=rank: rank)
        blocks.append(distributed.shard_bounds(n))
    assert blocks == expected


@pytest.mark.slow
def test_cli_under_torchrun_writes_one_report_equal_to_a_single_process(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", "codegen")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    score = ["score", "--model", str(model_dir), "--split", "dev", "--limit", "13"]
    one = subprocess.run([sys.executable, "-m", "mg_editing", *score, "--out", str(tmp_path / "one.json")],
                         env=env, capture_output=True, text=True, timeout=600)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mg_editing", *score, "--out", str(tmp_path / "two.json")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("| Model |") == 1  # process 0 alone reports
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert len(b["per_prompt_fb"]) == 13
    assert max(abs(x - y) for x, y in zip(a["per_prompt_fb"], b["per_prompt_fb"])) < 1e-6
    assert abs(a["fb_score"] - b["fb_score"]) < 1e-6
