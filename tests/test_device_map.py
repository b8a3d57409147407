"""A model split over two "devices" by accelerate (issue 7): CPU + disk offload.

This machine has one device, so the split is accelerate's big-model placement onto the CPU and
the disk (weights of the offloaded blocks stay on ``meta`` and are brought in by hooks for each
forward). Scoring, locating and editing must give what the unsplit model gives.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from conftest import save_tiny_model
from mg_editing import MGEditConfig, edit
from mg_editing.data import load_codegenbias
from mg_editing.locate import locate
from mg_editing.models import load_model_and_tokenizer
from mg_editing.scoring import pronoun_probabilities

#: blocks 1-2 (where the tiny model's bias is located) and the unembedding on the disk
SPLIT = {"transformer.wte": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.h.2": "disk",
         "transformer.ln_f": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("device_map") / "codegen", "codegen")


@pytest.fixture(scope="module")
def prompts():
    return list(load_codegenbias("dev")["prompt"][:6])


def _split(model_dir, tmp_path, how):
    if how == "auto":
        # a CPU budget smaller than the weights: accelerate sends the last blocks to the disk
        model, tok = load_model_and_tokenizer(model_dir, device_map="auto", max_memory={"cpu": "300KB"}, offload_folder=tmp_path)
    else:
        model, tok = load_model_and_tokenizer(model_dir, device_map=SPLIT, offload_folder=tmp_path)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    return model, tok


@pytest.mark.parametrize("how", ["auto", "explicit"])
def test_split_model_scores_and_locates_like_the_whole_one(model_dir, prompts, tmp_path, how):
    whole, tok = load_model_and_tokenizer(model_dir)
    split, _ = _split(model_dir, tmp_path, how)
    torch.testing.assert_close(pronoun_probabilities(split, tok, prompts), pronoun_probabilities(whole, tok, prompts), rtol=0, atol=1e-6)
    a = locate(whole, tok, prompts, "neuron", top_k=3, neuron_top_k=5, progress=False)
    b = locate(split, tok, prompts, "neuron", top_k=3, neuron_top_k=5, progress=False)
    assert (b.layer, b.modules) == (a.layer, a.modules)
    for name in a.rows:
        assert torch.equal(b.rows[name], a.rows[name]) and torch.equal(b.neurons[name], a.neurons[name])


@pytest.mark.parametrize("granularity", ["row", "neuron", "module"])
def test_split_model_edits_like_the_whole_one(model_dir, prompts, tmp_path, granularity):
    train = load_codegenbias("train").select(range(8))
    results, merged = {}, {}
    for how in ("whole", "split"):
        model, tok = load_model_and_tokenizer(model_dir) if how == "whole" else _split(model_dir, tmp_path / "off", "explicit")
        before = pronoun_probabilities(model, tok, prompts)
        locations = locate(model, tok, prompts, "neuron", top_k=3, neuron_top_k=5, progress=False)
        peft_model = get_peft_model(model, MGEditConfig(granularity=granularity, locations=locations.coarsen(granularity)))
        deltas = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        assert all(p.device.type == "cpu" for p in deltas.values())  # where the offloaded layer computes
        edit(peft_model, tok, train, steps=3, lr=0.05, recovery_texts=["def f(x):\n    return x\n"], progress=False)
        results[how] = {n: p.detach().clone() for n, p in deltas.items()}
        # PEFT merges into offloaded layers too (it onloads each one, merges, writes it back)
        merged[how] = pronoun_probabilities(peft_model.merge_and_unload(), tok, prompts)
    assert results["split"].keys() == results["whole"].keys()
    for name, value in results["whole"].items():
        assert value.abs().max() > 0, name  # the edit moved the deltas
        torch.testing.assert_close(results["split"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(merged["split"], merged["whole"], rtol=1e-4, atol=1e-6)
    assert (merged["split"] - before).abs().max() > 1e-6  # the merge changed the offloaded weights


def test_device_and_device_map_are_exclusive(model_dir):
    with pytest.raises(ValueError, match="not both"):
        load_model_and_tokenizer(model_dir, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="device_map"):
        load_model_and_tokenizer(model_dir, max_memory={"cpu": "1GB"})


@pytest.mark.slow
def test_pipeline_on_a_split_model_reports_what_the_whole_model_reports(model_dir, tmp_path):
    """`mg-edit run --device-map ...`: the split model is edited in place (not copied) and the
    adapter is taken out again between granularities; the report equals the whole model's."""
    import json

    from test_pipeline import SMALL

    from mg_editing.pipeline import RunSettings, run_pipeline

    settings = RunSettings(granularities=("row", "module"), **SMALL)
    run_pipeline(model_dir, tmp_path / "whole", settings, progress=False)
    run_pipeline(model_dir, tmp_path / "split", settings, progress=False, device_map=SPLIT, offload_folder=tmp_path / "off")
    whole, split = (json.loads((tmp_path / run / "report.json").read_text())["entries"] for run in ("whole", "split"))
    assert [e["name"] for e in split] == ["original model", "row granularity", "module granularity"]
    for a, b in zip(whole, split):
        for key in ("reliability_fb", "generality_fb"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["name"], key)
        assert b["locality"]["canonical_nll"] == pytest.approx(a["locality"]["canonical_nll"], abs=1e-4)
        assert b["locality"]["next_token_kl"] == pytest.approx(a["locality"]["next_token_kl"], abs=1e-5)
    assert split[1]["reliability_fb"] != split[0]["reliability_fb"]  # the edit did something
