import doctest
import evaluate
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from conftest import FAMILIES, make_model, make_tokenizer
from mg_editing.data import load_codegenbias
from mg_editing.metrics import FB_SCORE_PATH
from mg_editing.scoring import (
    encode_targets, fb_score, pronoun_log_probs, pronoun_probabilities, pronoun_probabilities_naive, score_dataset,
)


def test_fb_score_by_hand():
    # nurse fscore -0.1 -> f_he 0.45, f_she 0.55; lifeguard 0.0 -> 0.5 / 0.5.
    r = fb_score([0.7, 0.1], [0.2, 0.3], [-0.1, 0.0], ["Random-Pos", "Comparative-Neg"])
    first = abs(0.7 - 0.45) + abs(0.2 - 0.55)   # 0.60
    second = abs(0.1 - 0.5) + abs(0.3 - 0.5)    # 0.60
    assert r["fb_score"] == pytest.approx((first + second) / 2)
    assert r["per_category"] == pytest.approx({"Random-Pos": first, "Comparative-Neg": second})
    norm_first = abs(0.7 / 0.9 - 0.45) + abs(0.2 / 0.9 - 0.55)
    norm_second = abs(0.25 - 0.5) + abs(0.75 - 0.5)
    assert r["fb_score_normalized"] == pytest.approx((norm_first + norm_second) / 2)
    assert list(r["per_category"]) == ["Random-Pos", "Comparative-Neg"][::-1][::-1]  # Table III order


def test_fb_score_range_and_perfect():
    assert fb_score([1.0], [0.0], [-1.0])["fb_score"] == pytest.approx(2.0)
    assert fb_score([0.45], [0.55], [-0.1])["fb_score"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(p_he=[0.5], p_she=[0.5, 0.1], fscore=[0.0]), "differ in length"),
        (dict(p_he=[], p_she=[], fscore=[]), "no predictions"),
        (dict(p_he=[0.9], p_she=[0.5], fscore=[0.0]), "probabilities"),
        (dict(p_he=[0.5], p_she=[0.1], fscore=[1.5]), "fscore"),
        (dict(p_he=[float("nan")], p_she=[0.1], fscore=[0.0]), "NaN"),
        (dict(p_he=[0.5], p_she=[0.1], fscore=[0.0], categories=["Neutral"]), "unknown category"),
    ],
)
def test_fb_score_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fb_score(**kwargs)


def test_evaluate_metric_offline_and_by_path():
    for path in ("evaluate_metrics/fb_score", FB_SCORE_PATH):
        metric = evaluate.load(path)
        r = metric.compute(p_he=[0.7, 0.1], p_she=[0.2, 0.3], fscore=[-0.1, 0.0], category=["Random-Pos", "Comparative-Neg"])
        assert r["fb_score"] == pytest.approx(0.6)
        assert r["per_category"] == pytest.approx({"Random-Pos": 0.6, "Comparative-Neg": 0.6})
        assert "fb_score_normalized" in r


def test_metric_docstring_example_runs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fb_score_module", f"{FB_SCORE_PATH}/fb_score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    test = doctest.DocTestParser().get_doctest(module._KWARGS_DESCRIPTION, {}, "kwargs", None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize().failed == 0 and runner.summarize().attempted >= 3


PROMPTS = load_codegenbias("dev").select(range(0, 277, 40))["prompt"]


@pytest.mark.parametrize("variant", ["single", "split", "merge"])
def test_fast_scorer_matches_brute_force(family, variant):
    tok = {"single": make_tokenizer(), "split": make_tokenizer(split_pronouns=True), "merge": make_tokenizer(merge_boundary=True)}[variant]
    model = make_model(family, vocab_size=len(tok))
    fast = pronoun_probabilities(model, tok, PROMPTS, batch_size=5)
    naive = pronoun_probabilities_naive(model, tok, PROMPTS)
    assert torch.allclose(fast, naive, atol=1e-5, rtol=0)
    assert torch.allclose(fast, naive, rtol=1e-4, atol=0)  # also relatively, for tiny probabilities
    assert fast.dtype == torch.float64 and fast.shape == (len(PROMPTS), 2)


def test_targets_record_chain_rule_and_merges():
    split = encode_targets(make_tokenizer(split_pronouns=True), PROMPTS[:1])[0]
    assert len(split[1].target) > 1 and not split[1].merged
    merged = encode_targets(make_tokenizer(merge_boundary=True), PROMPTS[:1])[0]
    assert merged[0].merged and merged[1].merged


def test_prefix_cache_and_batch_size_do_not_change_results(tokenizer):
    model = make_model("llama", len(tokenizer))
    a = pronoun_probabilities(model, tokenizer, PROMPTS, batch_size=1, share_prefix=False)
    b = pronoun_probabilities(model, tokenizer, PROMPTS, batch_size=64)
    assert torch.allclose(a, b, atol=1e-9)


def test_tokenizer_padding_settings_do_not_matter():
    model = make_model("gpt2", len(make_tokenizer()))
    tok = make_tokenizer()
    base = pronoun_probabilities(model, tok, PROMPTS)
    for side in ("left", "right"):
        tok.padding_side = side
        tok.pad_token = tok.eos_token
        assert torch.equal(pronoun_probabilities(model, tok, PROMPTS), base)
    tok.pad_token = None
    tok.padding_side = "right"


def test_differentiable_log_probs_match(tokenizer):
    model = make_model("codegen", len(tokenizer))
    targets = encode_targets(tokenizer, PROMPTS[:4])
    lp = pronoun_log_probs(model, targets)
    assert lp.requires_grad
    lp.sum().backward()
    assert model.transformer.h[0].mlp.fc_in.weight.grad is not None
    assert torch.allclose(lp.detach().double().exp(), pronoun_probabilities(model, tokenizer, PROMPTS[:4]), atol=1e-6)


def test_score_dataset_table(tokenizer):
    model = make_model("gemma", len(tokenizer))
    rows = load_codegenbias("dev")
    rows = rows.select(range(0, len(rows), 9))
    result = score_dataset(model, tokenizer, rows, batch_size=8)
    expected = fb_score(result.p_he, result.p_she, rows["fscore"], rows["category"])
    assert result.fb_score == pytest.approx(expected["fb_score"])
    table = result.table("tiny")
    assert table.splitlines()[0].startswith("| Model | RoBERTa-Neg") and "Average" in table


def test_scorer_errors(tokenizer):
    model = make_model("gpt2", len(tokenizer))
    with pytest.raises(ValueError, match="empty"):
        pronoun_probabilities(model, tokenizer, [])
    small = make_model("gpt2", vocab_size=100)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        pronoun_probabilities(small, tokenizer, PROMPTS[:1])
    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "she": 2}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    no_he = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    with pytest.raises(ValueError, match="cannot express the pronoun 'he'"):
        pronoun_probabilities(make_model("gpt2", vocab_size=3), no_he, PROMPTS[:1])
    with pytest.raises(TypeError, match="causal LM"):
        pronoun_probabilities(BertModel(BertConfig(vocab_size=700, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)), tokenizer, PROMPTS[:1])
