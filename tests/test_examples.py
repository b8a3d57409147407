"""Every example script runs (on a tiny saved model) and asserts its own outcome."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def _run(script, *args, cwd=ROOT):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_load_codegenbias_example():
    assert "'train': 555" in _run("load_codegenbias.py")


def test_fb_score_metric_example(tiny_dir):
    assert "fb_score" in _run("fb_score_metric.py", "--model", tiny_dir, "--limit", "40")


@pytest.mark.slow
def test_locate_edit_and_share_examples(tiny_dir, tmp_path):
    out = tmp_path / "row-adapter"
    printed = _run("locate_and_edit.py", "--model", tiny_dir, "--out", out, "--steps", "10", "--locate-split", "dev")
    assert "dev FB-Score" in printed and (out / "adapter_model.safetensors").is_file()
    assert "max |p(adapter) - p(merged)|" in _run("share_adapter.py", "--adapter", out, "--model", tiny_dir)


@pytest.mark.slow
def test_compare_granularities_example(tiny_dir, tmp_path):
    printed = _run("compare_granularities.py", "--model", tiny_dir, "--out", tmp_path / "cmp", "--steps", "3",
                   "--score-stride", "25", "--locate-split", "dev", "--granularities", "row,neuron")
    assert "| row granularity |" in printed
