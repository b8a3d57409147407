"""Shared fixtures: tiny randomly initialised models of every supported family and small
tokenizers trained offline with ``tokenizers`` (no hub access anywhere in the suite)."""

from __future__ import annotations

import functools

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (
    AutoModelForCausalLM,
    CodeGenConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    StableLmConfig,
)

from mg_editing.data import DEMONSTRATIONS, build_prompt, load_professions, MODIFIERS

FAMILIES = ("gpt2", "codegen", "llama", "stablelm", "gemma")


def _corpus() -> list[str]:
    texts = [DEMONSTRATIONS]
    mods = [m for ms in MODIFIERS.values() for m in ms]
    for i, p in enumerate(load_professions()):
        texts.append(build_prompt(p.name, mods[i % len(mods)]) + ("he'" if i % 2 else "she'"))
    texts += ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 5
    return texts


@functools.lru_cache(maxsize=None)
def make_tokenizer(vocab_size: int = 600, split_pronouns: bool = False, merge_boundary: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on CodeGenBias-style text.

    With ``split_pronouns`` the vocabulary is too small to hold "he"/"she" as single tokens,
    so the scorer's chain rule over several tokens is exercised. With ``merge_boundary`` no
    regex pre-split is done, so merges such as ``'he`` cross the prompt/pronoun boundary.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merge_boundary)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    size = len(alphabet) + 1 if split_pronouns else vocab_size
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=alphabet, special_tokens=["<|endoftext|>"], show_progress=False)
    corpus = [DEMONSTRATIONS] + [" == 'he", " == 'she"] * 400 if merge_boundary else _corpus()
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    return fast


def make_config(family: str, vocab_size: int, n_layers: int = 3):
    common_llama = dict(
        num_hidden_layers=n_layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=1024,
        bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )
    if family == "gpt2":
        return GPT2Config(n_layer=n_layers, n_embd=32, n_head=4, vocab_size=vocab_size, n_positions=1024, bos_token_id=0, eos_token_id=0)
    if family == "codegen":
        return CodeGenConfig(n_layer=n_layers, n_embd=32, n_head=4, rotary_dim=4, vocab_size=vocab_size, n_positions=1024, n_ctx=1024, bos_token_id=0, eos_token_id=0)
    if family == "llama":
        return LlamaConfig(**common_llama)
    if family == "stablelm":
        return StableLmConfig(**common_llama)
    if family == "gemma":
        return GemmaConfig(head_dim=8, **common_llama)
    raise KeyError(family)


def make_model(family: str, vocab_size: int = 600, n_layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, vocab_size, n_layers))
    # Random init gives near-uniform next-token distributions; a larger output scale makes
    # the pronoun probabilities differ across prompts so comparisons are meaningful.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def save_tiny_model(path, family: str = "codegen"):
    """A tiny random model and its tokenizer saved with ``save_pretrained`` (loads by path)."""
    tok = make_tokenizer()
    make_model(family, len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def split_tokenizer():
    return make_tokenizer(split_pronouns=True)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_model(family, tokenizer):
    return make_model(family, vocab_size=len(tokenizer))
