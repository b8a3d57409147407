"""Locating phase: every stage against an independent computation, on all five families."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from conftest import FAMILIES, make_model
from mg_editing.data import load_codegenbias
from mg_editing.locate import (
    aggregate_topk,
    locate,
    locate_layer,
    locate_modules,
    locate_neurons,
    locate_rows,
    module_gradients,
    zeroed_modules,
)
from mg_editing.locations import Locations
from mg_editing.scoring import encode_targets, pronoun_probabilities_naive

FINAL_NORM = {"gpt2": "transformer.ln_f", "codegen": "transformer.ln_f", "llama": "model.norm",
              "stablelm": "model.norm", "gemma": "model.norm"}
N_PROMPTS = 4


@pytest.fixture(scope="module")
def prompts():
    return load_codegenbias("train+dev")["prompt"][:: 97][:N_PROMPTS]


def _ids(tokenizer, text):
    return torch.tensor([tokenizer(text)["input_ids"]])


def _pronoun_ids(tokenizer):
    he = tokenizer("he", add_special_tokens=False)["input_ids"]
    she = tokenizer("she", add_special_tokens=False)["input_ids"]
    assert len(he) == len(she) == 1
    return he[0], she[0]


def _hand_lens_probs(model, family, tokenizer, prompt):
    """(L + 1, 2): p(he), p(she) read from output_hidden_states through final norm + lm_head."""
    he, she = _pronoun_ids(tokenizer)
    with torch.no_grad():
        out = model(input_ids=_ids(tokenizer, prompt), output_hidden_states=True)
        norm = model.get_submodule(FINAL_NORM[family])
        rows = []
        hs = out.hidden_states
        for i in range(len(hs) - 1):  # embeddings and blocks 0..L-2: not normed yet
            rows.append(torch.softmax(model.lm_head(norm(hs[i][0, -1])).double(), -1)[[he, she]])
        # HF's last hidden state is already final-normed: the model's own logits are the lens.
        rows.append(torch.softmax(out.logits[0, -1].double(), -1)[[he, she]])
    return torch.stack(rows)


def _p_at_layer(model, family, tokenizer, prompt, layer):
    return _hand_lens_probs(model, family, tokenizer, prompt)[layer + 1]


def _weight_grad(model, module, ids, target_tokens, start):
    """d(-sum log p(target | prefix)) / dW by a plain full-model backward, in out x in layout."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    loss = -sum(logp[start - 1 + j, tok] for j, tok in enumerate(target_tokens))
    (grad,) = torch.autograd.grad(loss, module.weight)
    return grad.T if type(module).__name__ == "Conv1D" else grad


# -- layer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_importance_matches_hidden_states(family, tokenizer, prompts):
    model = make_model(family, len(tokenizer))
    targets = encode_targets(tokenizer, prompts)
    result = locate_layer(model, targets, batch_size=3)
    expected = torch.stack([_hand_lens_probs(model, family, tokenizer, p) for p in prompts])
    torch.testing.assert_close(result.lens_probs, expected, rtol=1e-4, atol=1e-7)
    importance = (expected[:, 1:] - expected[:, :-1]).abs().sum(-1)
    torch.testing.assert_close(result.importance, importance, rtol=1e-4, atol=1e-7)
    counts = torch.bincount(importance.argmax(1), minlength=model.config.num_hidden_layers)
    assert result.argmax_counts.tolist() == counts.tolist()
    assert int(counts[result.key_layer]) == int(counts.max())
    mean_layer = locate_layer(model, targets, layer_selection="mean").key_layer
    assert mean_layer == int(importance.mean(0).argmax())


# -- module ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_module_importance_matches_zeroed_copy(family, tokenizer, prompts):
    model = make_model(family, len(tokenizer))
    prompts = prompts[:2]
    targets = encode_targets(tokenizer, prompts)
    for layer in (1, model.config.num_hidden_layers - 1):  # a middle block (replay) and the last
        result = locate_modules(model, targets, layer, batch_size=3)
        reference = torch.stack([_p_at_layer(model, family, tokenizer, p, layer) for p in prompts])
        for m, name in enumerate(result.names):
            ablated_model = copy.deepcopy(model)
            module = ablated_model.get_submodule(name)
            with torch.no_grad():
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
            ablated = torch.stack([_p_at_layer(ablated_model, family, tokenizer, p, layer) for p in prompts])
            expected = (ablated - reference).abs().sum(-1)
            torch.testing.assert_close(result.importance[:, m], expected, rtol=1e-4, atol=1e-7)
        assert result.ranking[0] == result.names[int(result.importance.mean(0).argmax())]


def test_zeroed_modules_restores_weights_bit_exact(tokenizer):
    model = make_model("gpt2", len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = model.transformer.h[1].mlp.c_fc
    x = _ids(tokenizer, "def f(x):")
    with zeroed_modules(module), torch.no_grad():
        assert torch.count_nonzero(module(torch.randn(2, 32))) == 0
        model(input_ids=x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not module._forward_hooks


# -- row and neuron --------------------------------------------------------------------------
def _row_module(model):
    # Not the last block: there only the last position's output grad is non-zero, so for a
    # module after attention Grad_he[i] and Grad_she[i] are parallel and every cosine is +-1.
    return {"gpt2": "transformer.h.1.mlp.c_proj", "codegen": "transformer.h.1.mlp.fc_out"}.get(
        model.config.model_type, "model.layers.1.self_attn.o_proj")


@pytest.mark.parametrize("family", FAMILIES)
def test_row_and_neuron_importance_match_full_backward(family, tokenizer, prompts):
    model = make_model(family, len(tokenizer))
    name = _row_module(model)
    module = model.get_submodule(name)
    prompt = prompts[0]
    he, she = _pronoun_ids(tokenizer)
    ids = _ids(tokenizer, prompt)
    n = ids.shape[1]
    g_he = _weight_grad(model, module, ids, [he], n)
    g_she = _weight_grad(model, module, ids, [she], n)
    targets = encode_targets(tokenizer, [prompt])

    rows = locate_rows(model, targets, name, top_k=3)
    cos = torch.nn.functional.cosine_similarity(g_he, g_she, dim=1)
    torch.testing.assert_close(rows.mean_cosine, cos, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(cos[rows.rows].sort().values, cos.topk(3).values.sort().values, rtol=1e-3, atol=1e-4)
    assert rows.topk.shape == (1, 3)
    assert torch.equal(rows.rows, rows.rows.sort().values)

    searched = torch.tensor([0, 2, 5])
    neurons = locate_neurons(model, targets, name, searched, top_k=7)
    diff = (g_he - g_she).abs()[searched]
    torch.testing.assert_close(neurons.mean_importance, diff, rtol=1e-3, atol=1e-6)
    flat = diff.reshape(-1).topk(7).indices
    expected = {(int(searched[i // diff.shape[1]]), int(i % diff.shape[1])) for i in flat}
    assert set(zip(*neurons.neurons.tolist())) == expected


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_gradients_match_per_prompt_backward(family, tokenizer, prompts):
    model = make_model(family, len(tokenizer))
    name = _row_module(model)
    module = model.get_submodule(name)
    he, she = _pronoun_ids(tokenizer)
    grads = module_gradients(model, encode_targets(tokenizer, prompts), name, batch_size=3)
    for p, prompt in enumerate(prompts):
        ids = _ids(tokenizer, prompt)
        for k, tok in enumerate((he, she)):
            expected = _weight_grad(model, module, ids, [tok], ids.shape[1])
            torch.testing.assert_close(grads[p, k], expected, rtol=1e-3, atol=1e-6)


def test_multi_token_pronouns(split_tokenizer, prompts):
    tok = split_tokenizer
    prompts = [p[-160:] for p in prompts[:3]]  # byte-level tokens: keep the sequences short
    model = make_model("codegen", len(tok))
    targets = encode_targets(tok, prompts)
    assert any(len(t.target) > 1 for per in targets for t in per)
    # The last block's lens is the model output: its chain rule equals the reference scorer.
    layer = locate_layer(model, targets)
    torch.testing.assert_close(layer.lens_probs[:, -1], pronoun_probabilities_naive(model, tok, prompts), rtol=1e-4, atol=1e-9)
    # Gradients of the chain-rule loss against a plain backward on prompt + pronoun.
    name = "transformer.h.1.mlp.fc_out"
    module = model.get_submodule(name)
    grads = module_gradients(model, targets, name)
    prompt = prompts[0]
    base = tok(prompt)["input_ids"]
    for k, word in enumerate(("he", "she")):
        full = tok(prompt + word)["input_ids"]
        start = next(i for i, (a, b) in enumerate(zip(base + [None], full)) if a != b)
        expected = _weight_grad(model, module, torch.tensor([full[:-1]]), full[start:], start)
        torch.testing.assert_close(grads[0, k], expected, rtol=1e-3, atol=1e-6)
    locs = locate(model, tok, prompts, "neuron", top_k=4, neuron_top_k=10, progress=False)
    assert locs.meta["multi_token"] and locs.num_neurons >= 10


# -- pipeline, aggregation, serialisation, state ---------------------------------------------
def test_aggregate_topk_modes():
    topk = torch.tensor([[0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 5, 1]])
    assert aggregate_topk(topk, 8, "union")[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert aggregate_topk(topk, 8, "intersection")[0].tolist() == [2]
    assert aggregate_topk(topk, 8, "frequency", 0.5)[0].tolist() == [1, 2, 3]
    assert aggregate_topk(topk, 8, "frequency", 3)[0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="prompt count"):
        aggregate_topk(topk, 8, "frequency", 5)
    assert aggregate_topk(topk, 8, "union")[1].tolist() == [1, 3, 4, 2, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="unknown aggregate"):
        aggregate_topk(topk, 8, "majority")
    with pytest.raises(ValueError, match="fraction"):
        aggregate_topk(topk, 8, "frequency", 1.5)


def test_locate_pipeline_aggregations_and_round_trip(tokenizer, prompts, tmp_path):
    model = make_model("codegen", len(tokenizer))
    common = dict(top_k=4, neuron_top_k=12, progress=False)
    union = locate(model, tokenizer, prompts, "neuron", **common)
    assert union.layer is not None and len(union.modules) == 2
    module = union.modules[0]
    assert list(union.rows) == [module] and list(union.neurons) == [module]
    assert union.meta["module_ranking"][:2] == union.modules
    rows_u = set(union.rows[module].tolist())
    counts = union.scores["row_topk_counts"]
    assert rows_u == set((counts >= 1).nonzero()[:, 0].tolist())
    assert set(union.neurons[module][0].tolist()) <= rows_u
    for options, keep in (({"aggregate": "frequency", "min_frequency": 0.5}, counts >= 2),
                          ({"aggregate": "frequency", "min_frequency": 1}, counts >= 1),
                          ({"aggregate": "intersection"}, counts == len(prompts))):
        try:
            located = locate(model, tokenizer, prompts, "row", **options, **common)
            assert set(located.rows[module].tolist()) == set(keep.nonzero()[:, 0].tolist())
        except ValueError as err:  # an empty selection is an error, not empty locations
            assert "kept no row" in str(err) and not keep.any()
    for key in ("layer_importance", "layer_argmax_counts", "lens_p_he", "lens_p_she", "module_importance",
                "row_importance", "neuron_importance_top_row"):
        assert key in union.scores, key
    assert int(union.scores["layer_argmax_counts"].sum()) == len(prompts)

    union.save(tmp_path / "locs")
    loaded = Locations.load(tmp_path / "locs")
    assert loaded.granularity == "neuron" and loaded.modules == union.modules and loaded.layer == union.layer
    assert torch.equal(loaded.rows[module], union.rows[module])
    assert torch.equal(loaded.neurons[module], union.neurons[module])
    assert loaded.meta == union.meta
    for key, value in union.scores.items():
        torch.testing.assert_close(loaded.scores[key], value.float())
    assert loaded.coarsen("module").modules == union.modules

    from mg_editing.plots import plot_locations

    paths = plot_locations(loaded, tmp_path / "plots")
    assert [p.name for p in paths] == ["layer_locating.png", "module_importance.png", "row_importance.png",
                                       "neuron_importance.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_coarse_granularities_and_given_modules(tokenizer, prompts):
    model = make_model("llama", len(tokenizer))
    assert locate(model, tokenizer, prompts, "full", progress=False).granularity == "full"
    layer = locate(model, tokenizer, prompts, "layer", progress=False)
    assert layer.modules == [] and "module_importance" not in layer.scores
    module = locate(model, tokenizer, prompts, "module", n_modules=3, progress=False)
    assert module.layer == layer.layer and len(module.modules) == 3
    given = ["model.layers.1.mlp.down_proj"]
    rows = locate(model, tokenizer, prompts, "row", modules=given, top_k=2, progress=False)
    assert rows.layer == 1 and rows.modules == given and "layer_importance" not in rows.scores
    assert "module_importance" not in rows.scores


def test_model_state_unchanged(tokenizer, prompts):
    model = make_model("gpt2", len(tokenizer))
    model.transformer.wte.weight.requires_grad_(False)  # a mix of flags to restore
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    locate(model, tokenizer, prompts, "neuron", top_k=3, neuron_top_k=5, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bad_inputs(tokenizer, prompts):
    model = make_model("gpt2", len(tokenizer))
    with pytest.raises(ValueError, match="unknown granularity"):
        locate(model, tokenizer, prompts, "head", progress=False)
    with pytest.raises(KeyError, match="no linear module"):
        locate(model, tokenizer, prompts, "row", modules=["transformer.h.1.mlp.nope"], progress=False)
    with pytest.raises(ValueError, match="top_k=99 is larger"):
        locate(model, tokenizer, prompts, "row", modules=["transformer.h.1.attn.c_proj"], top_k=99, progress=False)
    with pytest.raises(ValueError, match="top_k=99 is larger"):
        locate_rows(model, encode_targets(tokenizer, prompts[:1]), "transformer.h.1.attn.c_proj", top_k=99)
    with pytest.raises(ValueError, match="no rows"):
        locate(model, tokenizer, [], "layer", progress=False)
    with pytest.raises(ValueError, match="no rows"):
        locate(model, tokenizer, load_codegenbias("dev").select([]), "layer", progress=False)
    with pytest.raises(ValueError, match="unknown aggregate"):
        locate(model, tokenizer, prompts, "row", aggregate="vote", progress=False)
    with pytest.raises(ValueError, match="n_modules"):
        locate(model, tokenizer, prompts, "module", n_modules=50, progress=False)

    class Opaque(nn.Module):  # no spec, no ModuleList of num_hidden_layers blocks
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="mystery", num_hidden_layers=4)
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="cannot find the decoder blocks"):
        locate(Opaque(), tokenizer, prompts, "layer", progress=False)


def test_cli_locate(tokenizer, tmp_path, capsys):
    from mg_editing.cli import main

    model = make_model("gpt2", len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    code = main(["locate", "--model", str(tmp_path / "model"), "--granularity", "neuron", "--limit", "3",
                 "--top-k", "3", "--neuron-top-k", "5", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "key layer" in text and "neurons:" in text
    assert Locations.load(out).granularity == "neuron"
    assert (out / "row_importance.png").is_file()
    code = main(["locate", "--model", str(tmp_path / "model"), "--limit", "2", "--modules", "transformer.h.9.mlp.c_fc",
                 "--out", str(out)])
    assert code == 2 and "no linear module" in capsys.readouterr().err


def test_row_ties_are_broken_by_gradient_magnitude():
    from mg_editing.locate import _top_rows

    # last-block case: cosines are +-1 up to float noise; the largest gradients must win
    cos = torch.tensor([[1.0 - 1e-7, 1.0, -1.0, 1.0 + 1e-7, 1.0]])
    magnitude = torch.tensor([[5.0, 1.0, 9.0, 2.0, 7.0]])
    assert _top_rows(cos, magnitude, "largest", 3).tolist() == [[4, 0, 3]]
    assert _top_rows(cos, magnitude, "smallest", 1).tolist() == [[2]]
    # real cosine differences still dominate the magnitude
    assert _top_rows(torch.tensor([[0.5, 0.9]]), torch.tensor([[100.0, 1.0]]), "largest", 1).tolist() == [[1]]
