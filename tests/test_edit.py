import json
import math

import pytest
import torch
from peft import get_peft_model

from conftest import make_model
from mg_editing import Locations, MGEditConfig
from mg_editing.architecture import get_architecture
from mg_editing.data import load_codegenbias
from mg_editing.edit import EditConfig, edit, objective_loss

TRAIN = load_codegenbias("train").select(range(0, 555, 37))
DEV = load_codegenbias("dev").select(range(0, 277, 40))
RECOVERY = ["def add(a, b):\n    return a + b\n", "def neg(x):\n    return -x\n"]


def test_objectives_by_hand():
    p = torch.tensor([[0.6, 0.1], [0.2, 0.5]])
    f_he, f_she = torch.tensor([0.45, 1.0]), torch.tensor([0.55, 0.0])
    paper = ((0.45 * 0.6 + 0.55 * 0.1) + (1.0 * 0.2 + 0.0 * 0.5)) / 2
    fb = ((0.15 + 0.45) + (0.8 + 0.5)) / 2
    assert objective_loss("paper", p, f_he, f_she).item() == pytest.approx(paper)
    assert objective_loss("fb", p, f_he, f_she).item() == pytest.approx(fb)
    with pytest.raises(ValueError, match="unknown objective"):
        objective_loss("kl", p, f_he, f_she)


def _row_locations(model, n_rows=4):
    arch = get_architecture(model)
    name = sorted(arch.weight_modules(arch.num_layers - 1))[-1]
    return Locations("row", modules=[name], layer=arch.num_layers - 1, rows={name: torch.arange(n_rows)})


@pytest.mark.parametrize("objective", ["fb", "paper"])
def test_edit_changes_only_located_parameters(family, tokenizer, objective):
    model = make_model(family, len(tokenizer))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, MGEditConfig(granularity="row", locations=_row_locations(model)))
    deltas = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    result = edit(peft_model, tokenizer, TRAIN, dev_dataset=DEV, objective=objective, steps=6, eval_every=2,
                  lr=5e-2, batch_size=4, recovery_texts=RECOVERY, patience=None, progress=False)
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, deltas[n])]
    assert result.best_step == 0 or changed  # the kept state moved the deltas unless step 0 was best
    merged_free = peft_model.get_base_model().state_dict()
    for key, value in base_state.items():
        # every base weight, including the located module's own weight, is untouched
        matches = [k for k in merged_free if k.replace(".base_layer", "") == key]
        assert matches, key
        assert torch.equal(merged_free[matches[0]], value), key


def test_edit_lowers_the_objective_and_keeps_best_state(tokenizer):
    model = make_model("codegen", len(tokenizer))
    arch = get_architecture(model)
    locs = Locations("module", modules=sorted(arch.weight_modules(2)), layer=2)
    peft_model = get_peft_model(model, MGEditConfig(granularity="module", locations=locs))
    result = edit(peft_model, tokenizer, TRAIN, dev_dataset=DEV, objective="fb", steps=12, eval_every=3,
                  lr=2e-2, batch_size=8, recovery_weight=0.0, patience=None, progress=False)
    evaluated = [h["dev_fb"] for h in result.history if "dev_fb" in h]
    assert result.best_dev_fb == min(evaluated) and result.best_dev_fb < evaluated[0]
    from mg_editing.scoring import fb_score, pronoun_probabilities

    probs = pronoun_probabilities(peft_model, tokenizer, DEV["prompt"])
    assert fb_score(probs[:, 0], probs[:, 1], DEV["fscore"])["fb_score"] == pytest.approx(result.best_dev_fb, abs=1e-9)


def test_history_json_and_determinism(tokenizer, tmp_path):
    runs = []
    for i in range(2):
        model = make_model("llama", len(tokenizer))
        peft_model = get_peft_model(model, MGEditConfig(granularity="row", locations=_row_locations(model)))
        result = edit(peft_model, tokenizer, TRAIN, dev_dataset=DEV, steps=4, eval_every=2, batch_size=4,
                      recovery_texts=RECOVERY, history_path=tmp_path / f"h{i}.json", progress=False, seed=3)
        runs.append(json.loads((tmp_path / f"h{i}.json").read_text()))
    assert runs[0]["history"] == runs[1]["history"]
    assert runs[0]["config"]["seed"] == 3 and any("dev_fb" in h for h in runs[0]["history"])


def test_non_finite_loss_stops_with_clear_message(tokenizer):
    model = make_model("gpt2", len(tokenizer))
    peft_model = get_peft_model(model, MGEditConfig(granularity="row", locations=_row_locations(model)))
    with torch.no_grad():
        next(p for p in peft_model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="Lower the learning rate"):
        edit(peft_model, tokenizer, TRAIN, steps=3, recovery_texts=RECOVERY, progress=False)


def test_bad_options(tokenizer):
    model = make_model("gpt2", len(tokenizer))
    with pytest.raises(ValueError, match="no trainable parameters"):
        edit(model.requires_grad_(False), tokenizer, TRAIN, steps=1, recovery_texts=RECOVERY, progress=False)
    with pytest.raises(ValueError, match="unknown objective"):
        EditConfig(objective="ce")
    with pytest.raises(TypeError, match="unknown edit option"):
        edit(model, tokenizer, TRAIN, stepz=3)
    with pytest.raises(ValueError, match="no rows"):
        edit(model, tokenizer, [], steps=1)
