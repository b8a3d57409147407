import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import save_tiny_model
from mg_editing.cli import main
from mg_editing.edit import EditConfig
from mg_editing.locations import GRANULARITIES
from mg_editing.pipeline import RunSettings, run_pipeline

SMALL = dict(
    edit=EditConfig(steps=3, eval_every=1, batch_size=4, recovery_batch_size=2, recovery_max_length=64),
    locate_split="dev", locate_options={"batch_size": 16}, score_batch_size=64, score_stride=20,
    n_samples=2, max_new_tokens=12, generation_batch_size=8, humaneval_limit=3, kl_prompts=2,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-codegen"), "codegen")


def _entries(out):
    return json.loads((Path(out) / "report.json").read_text())["entries"]


@pytest.mark.slow
def test_pipeline_all_granularities_and_resume(tiny_dir, tmp_path):
    settings = RunSettings(allow_code_execution=True, **SMALL)
    paths = run_pipeline(tiny_dir, tmp_path / "run", settings, progress=False)
    report = paths["markdown"].read_text()
    entries = _entries(tmp_path / "run")
    assert [e["name"] for e in entries] == ["original model"] + [f"{g} granularity" for g in GRANULARITIES]
    for e in entries:
        assert 0 <= e["reliability_fb"] <= 2 and 0 <= e["generality_fb"] <= 2
        assert {"pass@1", "greedy_pass@1", "canonical_nll", "next_token_kl"} <= set(e["locality"])
    assert "| LLM | Reliability-FB-Score" in report and "Table III layout" in report
    assert paths["plot"].is_file() and (tmp_path / "run" / "locations" / "locations.json").is_file()
    for g in GRANULARITIES:
        assert (tmp_path / "run" / "adapters" / g / "adapter_model.safetensors").is_file()
    # resume: a finished run recomputes nothing; a lost stage is redone identically
    import shutil

    shutil.rmtree(tmp_path / "run" / "adapters" / "neuron")
    (tmp_path / "run" / "report.json").unlink()
    run_pipeline(tiny_dir, tmp_path / "run", settings, progress=False)
    assert _entries(tmp_path / "run") == entries


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_report(tiny_dir, tmp_path):
    args = [sys.executable, "-m", "mg_editing", "run", "--model", str(tiny_dir), "--granularities", "module,row",
            "--steps", "40", "--humaneval-limit", "2", "--n-samples", "1", "--max-new-tokens", "8",
            "--score-stride", "20", "--locate-split", "dev"]
    env = dict(os.environ, MG_EDIT_ALLOW_CODE_EVAL="0")
    reference = subprocess.run(args + ["--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-2000:]
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "cut")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # kill it in the middle of the row edit
        if "row: editing" in line:
            time.sleep(1.0)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "report.json").exists()
    resumed = subprocess.run(args + ["--out", str(tmp_path / "cut")], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "module: reusing" in resumed.stdout
    assert _entries(tmp_path / "cut") == _entries(tmp_path / "ref")


def test_settings_mismatch_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"model": "other"}))
    with pytest.raises(ValueError, match="other settings"):
        run_pipeline(tiny_dir, out, RunSettings(granularities=("full",), **SMALL), progress=False)


def test_bad_granularity_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--model", "x", "--out", "y", "--granularities", "rows"])
    assert "unknown granularity" in capsys.readouterr().err
