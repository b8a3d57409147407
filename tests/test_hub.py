"""Sharing adapters: the model card, and loading an adapter by Hub id from the Hub cache."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from peft import get_peft_model

from conftest import make_model
from mg_editing import Locations, MGEditConfig
from mg_editing.hub import adapter_model_card, push_adapter, save_adapter


def _row_adapter(tokenizer, save_base_to=None):
    model = make_model("codegen", len(tokenizer))
    if save_base_to is not None:
        model.save_pretrained(save_base_to)  # before the adapter layers are injected
    name = "transformer.h.2.mlp.fc_out"
    locs = Locations("row", modules=[name], layer=2, rows={name: torch.tensor([1, 5, 9])})
    peft_model = get_peft_model(model, MGEditConfig(granularity="row", locations=locs))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return peft_model


def test_model_card_says_what_and_how(tokenizer, tmp_path):
    card = adapter_model_card(
        base_model="org/base", granularity="row", locations_summary={"modules": ["m"], "rows": 3},
        metrics={"before": {"reliability_fb": 0.9, "pass@1": 0.2}, "after": {"reliability_fb": 0.3, "pass@1": 0.19}},
        objective="fb", repo_id="me/adapter",
    )
    assert card.startswith("---\nbase_model: org/base\nlibrary_name: peft\n")
    for tag in ("- peft", "- mg-editing", "- debiasing"):
        assert tag in card
    assert "| Reliability FB-Score (train, ↓) | 0.9000 | 0.3000 |" in card
    assert 'PeftModel.from_pretrained(base, "me/adapter")' in card and "merge_and_unload" in card
    out = save_adapter(_row_adapter(tokenizer), tmp_path / "a", card=card)
    assert (out / "README.md").read_text() == card
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def test_push_needs_a_saved_adapter(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        push_adapter(tmp_path, "me/x")


def test_load_by_hub_id_from_the_cache_offline(tokenizer, tmp_path):
    """`PeftModel.from_pretrained(base, "user/repo")` resolves a Hub id through the HF cache."""
    base_dir = tmp_path / "base"
    peft_model = _row_adapter(tokenizer, save_base_to=base_dir)
    ids = torch.tensor([tokenizer.encode("def find_best_nurses(nurses, personal_pronoun):")])
    expected = peft_model(ids).logits
    snapshot = tmp_path / "hub" / "models--someone--codegen-mg-edit-row" / "snapshots" / ("a" * 40)
    save_adapter(peft_model, snapshot)
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch, mg_editing
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, "someone/codegen-mg-edit-row").eval()
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        got = model(ids).logits
        assert torch.allclose(got, torch.load({str(tmp_path / 'expected.pt')!r}), atol=1e-5)
        merged = model.merge_and_unload()
        assert torch.allclose(merged(ids).logits, got, atol=1e-5)
        print("OK")
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
