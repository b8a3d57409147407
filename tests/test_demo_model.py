"""The demo model: corpus, tokenizer, cache, CLI (fast), and the full build's acceptance (slow)."""

from __future__ import annotations

import ast
import dataclasses
import math

import pytest
import torch

from mg_editing import demo_model as dm
from mg_editing.data import DEMONSTRATIONS, MODIFIERS, build_prompt, load_professions

TINY = dataclasses.replace(
    dm.DemoRecipe(),
    functions_per_profession=2,
    stdlib_chars=20_000,
    vocab_size=700,
    n_layer=2,
    n_embd=32,
    n_head=4,
    rotary_dim=4,
    n_positions=128,
    seq_len=64,
    template_rows_per_step=2,
    humaneval_rows_per_step=1,
    stdlib_rows_per_step=1,
    steps=3,
    warmup_steps=1,
)


@pytest.fixture(scope="module")
def corpus():
    return dm.generate_corpus(0)


@pytest.fixture(scope="module")
def small_tokenizer(corpus):
    texts = list(corpus.template_documents[:300]) + list(corpus.humaneval_documents)
    return dm.build_demo_tokenizer(texts, vocab_size=1200)


def test_corpus_is_deterministic(corpus):
    again = dm.generate_corpus(0)
    assert again == corpus
    other = dm.generate_corpus(1)
    assert other.template_documents != corpus.template_documents
    assert other.humaneval_pairs == corpus.humaneval_pairs  # code is the same for every seed


def test_template_documents_follow_the_fewshot_format(corpus):
    recipe = dm.DemoRecipe()
    n_functions = recipe.functions_per_profession * len(load_professions())
    assert len(corpus.template_documents) == math.ceil(n_functions / recipe.functions_per_document)
    assert all(doc.startswith(DEMONSTRATIONS) for doc in corpus.template_documents)
    doc = corpus.template_documents[0]
    body = doc[len(DEMONSTRATIONS) :]
    assert body.startswith("def find_") and "personal_pronoun == '" in body
    ast.parse(doc)  # completed functions: the whole document is valid Python
    # The first function after the demonstrations continues a CodeGenBias prompt exactly.
    for doc in corpus.template_documents[:200]:
        lines = doc[len(DEMONSTRATIONS) :].splitlines()
        profession = lines[3].split(".personal_pronoun")[0].split()[-1]
        modifier = lines[0][len("def find_") : lines[0].index(f"_{profession}s(")]
        assert doc.startswith(build_prompt(profession, modifier))


def test_pronoun_literals_follow_the_stereotype_score(corpus):
    counts: dict[str, dict[str, int]] = {}
    for doc in corpus.template_documents:
        for line_no, line in enumerate(doc.splitlines()):
            if "personal_pronoun == '" in line and line_no > 11:
                profession = line.split(".personal_pronoun")[0].split()[-1]
                value = line.split("== '")[1].split("'")[0]
                counts.setdefault(profession, {}).setdefault(value, 0)
                counts[profession][value] += 1
    professions = {p.name: p for p in load_professions()}
    assert set(counts) == set(professions)
    total = sum(sum(c.values()) for c in counts.values())
    pronouns = sum(c.get("he", 0) + c.get("she", 0) for c in counts.values())
    assert 0.8 < pronouns / total < 0.9  # p(he) + p(she) < 1, as in real models
    for name, c in counts.items():
        s = professions[name].sscore
        if s >= 0.3:
            assert c.get("he", 0) > c.get("she", 0), (name, s, c)
        if s <= -0.3:
            assert c.get("she", 0) > c.get("he", 0), (name, s, c)
    modifiers_seen = {line.split("_")[1] for doc in corpus.template_documents for line in doc.splitlines()[12:] if line.startswith("def find_")}
    assert {m for ms in MODIFIERS.values() for m in ms} <= modifiers_seen
    assert len(modifiers_seen) > 50


def test_corpus_has_real_code(corpus):
    assert len(corpus.humaneval_pairs) == 164
    assert corpus.humaneval_pairs[0][0].startswith("from typing import List")
    assert len(corpus.stdlib_files) >= 10 and corpus.stdlib_files == tuple(sorted(corpus.stdlib_files))
    assert sum(map(len, corpus.stdlib_documents)) <= dm.DemoRecipe().stdlib_chars
    for text in corpus.humaneval_documents[:5] + corpus.stdlib_documents[:3]:
        ast.parse(text)


@pytest.mark.parametrize("profession", ["nurse", "carpenter", "police_officer", "homemaker"])
@pytest.mark.parametrize("modifier", ["sick", "propitious", "best"])
def test_he_and_she_are_single_tokens_after_the_prompt(small_tokenizer, profession, modifier):
    prompt = build_prompt(profession, modifier)
    base = small_tokenizer(prompt)["input_ids"]
    for word in ("he", "she"):
        ids = small_tokenizer(prompt + word)["input_ids"]
        assert ids[: len(base)] == base and len(ids) == len(base) + 1
        assert small_tokenizer.decode(ids[-1:]) == word


def test_pronoun_positions_are_weighted(corpus, small_tokenizer):
    pools = dm._training_pools(dataclasses.replace(corpus, template_documents=corpus.template_documents[:20], stdlib_documents=corpus.stdlib_documents[:1]), small_tokenizer, dm.DemoRecipe())
    rows, weight, _ = pools["template"]
    heavy = weight > 1
    # one pronoun-slot literal per template function that fits in the row
    assert 2 * len(rows) <= heavy.sum() <= dm.DemoRecipe().functions_per_document * len(rows)
    values = {small_tokenizer.decode([t]) for t in rows[heavy].tolist()}
    assert values <= {"he", "she", *dm.OTHER_VALUES}


def test_is_demo():
    assert dm.is_demo("demo") and dm.is_demo(" Demo ")
    assert not dm.is_demo("Salesforce/codegen-350M-mono") and not dm.is_demo(None)


def test_cache_location_and_missing_build(tmp_path, monkeypatch):
    monkeypatch.setenv("MG_EDITING_CACHE", str(tmp_path))
    path = dm.demo_model_dir(3)
    assert path.parent == tmp_path / "demo-model"
    assert path.name.startswith(dm.RECIPE_VERSION) and path.name.endswith("-seed3")
    with pytest.raises(FileNotFoundError, match="mg-edit demo-model build"):
        dm.demo_model_path(build=False, seed=3)
    path.mkdir(parents=True)
    (path / dm.MANIFEST_NAME).write_text("{}")
    assert dm.demo_model_path(build=False, seed=3) == path  # reused, not rebuilt


def test_tiny_build_is_deterministic_loadable_and_atomic(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = dm.build_demo_model(tmp_path / "a", seed=0, progress=False, recipe=TINY)
    b = dm.build_demo_model(tmp_path / "b", seed=0, progress=False, recipe=TINY)
    model_a = AutoModelForCausalLM.from_pretrained(a)
    model_b = AutoModelForCausalLM.from_pretrained(b)
    tokenizer = AutoTokenizer.from_pretrained(a)
    assert type(model_a).__name__ == "CodeGenForCausalLM"
    assert tokenizer.eos_token and tokenizer.pad_token and tokenizer.bos_token
    names = {n for n, _ in model_a.named_modules()}
    assert {"transformer.h.0.attn.qkv_proj", "transformer.h.0.attn.out_proj", "transformer.h.0.mlp.fc_in", "transformer.h.0.mlp.fc_out"} <= names
    state_b = model_b.state_dict()
    assert all(torch.equal(v, state_b[k]) for k, v in model_a.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp dirs left
    # a complete build is reused as is
    assert dm.build_demo_model(a, recipe=TINY, progress=False) == a
    with pytest.raises(ValueError, match="out_dir"):
        dm.build_demo_model(None, recipe=TINY)


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "_train", boom)
    with pytest.raises(KeyboardInterrupt):
        dm.build_demo_model(tmp_path / "m", progress=False, recipe=TINY)
    assert list(tmp_path.iterdir()) == []


def test_cli_reuses_a_complete_build(tmp_path, capsys):
    from mg_editing.cli import main

    out = tmp_path / "model"
    out.mkdir()
    (out / dm.MANIFEST_NAME).write_text("{}")
    assert main(["demo-model", "build", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "already built" in captured.err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    assert main(["demo-model", "build", "--out", str(tmp_path / "junk")]) == 2


# ---------------------------------------------------------------------------------------------
# The full build (about 3 minutes on 2 CPU cores): the acceptance numbers of the demo model.


def _greedy_valid(model, tokenizer, n: int = 16) -> int:
    """How many greedy completions (the package's generation, HumanEval stop sequences) of the
    first ``n`` HumanEval prompts parse as Python together with their prompt."""
    from mg_editing.locality import generate_completions, humaneval_problems

    problems = humaneval_problems("all")[:n]
    prompts = [p["prompt"] for p in problems]
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens=128, progress=False)
    valid = 0
    for prompt, (text,) in zip(prompts, completions):
        try:
            ast.parse(prompt + text)
            valid += 1
        except SyntaxError:
            pass
    return valid


@pytest.mark.slow
def test_full_demo_model_is_biased_and_writes_python():
    import numpy as np
    from scipy.stats import spearmanr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mg_editing.data import load_codegenbias
    from mg_editing.scoring import fb_score, pronoun_probabilities

    path = dm.demo_model_path(build=True, progress=False)  # the cached build every command uses
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    test = load_codegenbias("test")
    probs = pronoun_probabilities(model, tokenizer, test["prompt"], batch_size=64)
    p_he, p_she = probs[:, 0].numpy(), probs[:, 1].numpy()
    assert fb_score(p_he, p_she, test["fscore"])["fb_score"] >= 0.5
    preference = p_he / (p_he + p_she)
    rho_s = spearmanr(preference, np.asarray(test["sscore"])).statistic
    rho_f = spearmanr(preference, np.asarray(test["fscore"])).statistic
    assert rho_s > rho_f
    assert _greedy_valid(model, tokenizer) >= 8
