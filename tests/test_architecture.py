import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from conftest import FAMILIES, make_model
from mg_editing.architecture import (
    FAMILY_SPECS, get_architecture, is_conv1d, trace_layer_outputs, weight_out_in,
)


def test_every_family_has_a_spec_that_matches(family, tokenizer):
    model = make_model(family, len(tokenizer))
    arch = get_architecture(model)
    assert not arch.discovered and arch.spec is FAMILY_SPECS[family]
    assert arch.num_layers == 3
    names = set(arch.weight_modules(0))
    for path in arch.spec.modules.values():
        assert f"{arch.layer_name(0)}.{path}" in names


def test_logit_lens_of_last_layer_is_the_model_output(family, tokenizer):
    model = make_model(family, len(tokenizer))
    arch = get_architecture(model)
    ids = torch.tensor([tokenizer.encode("def find_best_nurses(nurses, personal_pronoun):")])
    model(ids, output_hidden_states=True)  # transformers adds its own capture hooks on first use
    hooks_before = [len(l._forward_hooks) + len(l._forward_pre_hooks) for l in arch.layers]
    with trace_layer_outputs(arch) as states:
        out = model(ids, output_hidden_states=True)
    assert sorted(states) == [-1, 0, 1, 2]
    for i in range(arch.num_layers - 1):  # HF's hidden_states[i+1] is block i's output
        assert torch.allclose(states[i], out.hidden_states[i + 1], atol=1e-6)
    assert torch.allclose(arch.logits(states[arch.num_layers - 1]), out.logits, atol=1e-5)
    # hooks removed: a second forward adds nothing
    n = len(states)
    model(ids)
    assert len(states) == n
    assert [len(l._forward_hooks) + len(l._forward_pre_hooks) for l in arch.layers] == hooks_before


def test_conv1d_is_decided_by_type_not_shape(tokenizer):
    model = make_model("gpt2", len(tokenizer))
    c_proj = model.transformer.h[0].attn.c_proj  # square 32 x 32
    assert is_conv1d(c_proj) and c_proj.weight.shape[0] == c_proj.weight.shape[1]
    assert torch.equal(weight_out_in(c_proj), c_proj.weight.t())
    c_fc = model.transformer.h[0].mlp.c_fc  # in 32 -> out 128, stored 32 x 128
    assert weight_out_in(c_fc).shape == (128, 32)


def test_unknown_family_falls_back_to_discovery():
    config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=100)
    model = AutoModelForCausalLM.from_config(config)
    arch = get_architecture(model)
    assert arch.discovered and arch.spec.layers == "gpt_neox.layers" and arch.spec.final_norm == "gpt_neox.final_layer_norm"
    ids = torch.tensor([[1, 2, 3]])
    with trace_layer_outputs(arch) as states:
        out = model(ids)
    assert torch.allclose(arch.logits(states[1]), out.logits, atol=1e-5)


def test_clear_errors(tokenizer):
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "mystery", "num_hidden_layers": 4})()
            self.body = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="cannot find the decoder blocks"):
        get_architecture(NoLayers())
    arch = get_architecture(make_model("llama", len(tokenizer)))
    with pytest.raises(KeyError, match="no linear module"):
        arch.module("model.layers.0.mlp.fc_in")
    with pytest.raises(ValueError, match="out of range"):
        arch.layer_name(7)


def test_trace_can_stop_the_forward_early(tokenizer):
    from mg_editing.architecture import StopForward

    model = make_model("llama", len(tokenizer))
    arch = get_architecture(model)
    with trace_layer_outputs(arch, stop_after=0) as states:
        with pytest.raises(StopForward):
            model(torch.tensor([[1, 2, 3]]))
    assert sorted(states) == [-1, 0]
