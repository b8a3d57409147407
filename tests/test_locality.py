"""Locality: HumanEval problems, pass@k, generation, canonical NLL and next-token KL."""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from mg_editing.locality import (
    HELDOUT_SLICE,
    RECOVERY_SLICE,
    STOP_SEQUENCES,
    build_program,
    canonical_nll,
    evaluate_humaneval,
    generate_completions,
    humaneval_problems,
    next_token_kl,
    pass_at_k,
    recovery_texts,
    score_completions,
    truncate_completion,
)
from mg_editing.sandbox import ALLOW_CODE_EVAL_ENV, CodeExecutionNotAllowedError

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="code execution uses the Linux sandbox")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run ~10x faster on one thread when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return make_model("gpt2", vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def few_problems():
    return humaneval_problems("heldout")[:5]


# --- problems --------------------------------------------------------------------------------


def test_problem_splits():
    heldout, recovery, everything = (humaneval_problems(w) for w in ("heldout", "recovery", "all"))
    assert (len(heldout), len(recovery), len(everything)) == (148, 16, 164)
    assert recovery[0]["task_id"] == "HumanEval/0" and recovery[-1]["task_id"] == "HumanEval/15"
    assert heldout[0]["task_id"] == "HumanEval/16" and heldout[-1]["task_id"] == "HumanEval/163"
    assert everything[RECOVERY_SLICE] == recovery and everything[HELDOUT_SLICE] == heldout
    texts = recovery_texts()
    assert texts == [p["prompt"] + p["canonical_solution"] for p in recovery]
    with pytest.raises(ValueError, match="which"):
        humaneval_problems("test")


def test_problems_are_copies():
    humaneval_problems()[0]["prompt"] = "mutated"
    assert humaneval_problems()[0]["prompt"] != "mutated"


# --- pass@k ----------------------------------------------------------------------------------


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_closed_form():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for n, c, k in [(10, 3, 1), (10, 3, 5), (10, 0, 10), (10, 10, 1), (20, 7, 10), (200, 13, 100), (5, 4, 2)]:
        assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)


def test_pass_at_k_vectorised():
    n = np.array([10, 10, 20, 5])
    c = np.array([3, 0, 20, 1])
    got = pass_at_k(n, c, 2)
    assert isinstance(got, np.ndarray) and got.shape == (4,)
    np.testing.assert_allclose(got, [closed_form(*x, 2) for x in zip(n, c)], atol=1e-12)


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="exceeds"):
        pass_at_k(5, 1, 10)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 0)


# --- executing completions -------------------------------------------------------------------


@linux_only
def test_canonical_solutions_pass_and_wrong_ones_fail(few_problems):
    canonical = [[p["canonical_solution"]] * 2 for p in few_problems]
    wrong = [["    return None\n", "    raise NotImplementedError\n"] for _ in few_problems]
    mixed = [[p["canonical_solution"], "    return None\n"] for p in few_problems]
    kwargs = dict(allow_code_execution=True, progress=False, timeout=3.0)
    good = score_completions(few_problems, canonical, **kwargs)
    bad = score_completions(few_problems, wrong, **kwargs)
    half = score_completions(few_problems, mixed, ks=(1, 2), **kwargs)
    assert (good["pass@1"], bad["pass@1"]) == (1.0, 0.0)
    assert half["pass@1"] == pytest.approx(0.5) and half["pass@2"] == 1.0
    assert [row["correct"] for row in half["per_problem"]] == [1] * len(few_problems)
    assert [row["task_id"] for row in good["per_problem"]] == [p["task_id"] for p in few_problems]
    assert all(s == "passed" for row in good["per_problem"] for s in row["statuses"])


def test_build_program_calls_check(few_problems):
    problem = few_problems[0]
    program = build_program(problem, problem["canonical_solution"])
    assert program.startswith(problem["prompt"] + problem["canonical_solution"])
    assert program.rstrip().endswith(f"check({problem['entry_point']})")


def test_score_completions_input_errors(few_problems):
    one = [["    pass\n"] for _ in few_problems]
    with pytest.raises(CodeExecutionNotAllowedError):
        score_completions(few_problems, one, allow_code_execution=False)
    with pytest.raises(ValueError, match="no problems"):
        score_completions([], [], allow_code_execution=True)
    with pytest.raises(ValueError, match="k=\\[10\\]"):
        score_completions(few_problems, one, ks=(1, 10), allow_code_execution=True)
    with pytest.raises(ValueError, match="completion lists"):
        score_completions(few_problems, one[:-1], allow_code_execution=True)
    with pytest.raises(ValueError, match="same"):
        score_completions(few_problems, [["a"]] + [["a", "b"]] * (len(few_problems) - 1), allow_code_execution=True)


# --- generation ------------------------------------------------------------------------------


def test_truncate_completion():
    text = "    return a + b\n\ndef other():\n    pass\n"
    assert truncate_completion(text) == "    return a + b\n"
    assert truncate_completion("    x = 1\nprint(x)") == "    x = 1"
    assert truncate_completion("    return 1") == "    return 1"
    assert {"\nclass", "\ndef", "\n#", "\nif", "\nprint"} <= set(STOP_SEQUENCES)


class CountingForward:
    """Counts the model's forward calls (one per generated token with a KV cache)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def test_generation_shapes_and_determinism(gpt2, tokenizer):
    prompts = ["def add(a, b):\n", "for i in range(3):\n    x = i\n", "x = 1\n"]
    kwargs = dict(max_new_tokens=12, progress=False, stop_sequences=())
    state = torch.get_rng_state()
    first = generate_completions(gpt2, tokenizer, prompts, n_samples=3, do_sample=True, seed=7, batch_size=4, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    again = generate_completions(gpt2, tokenizer, prompts, n_samples=3, do_sample=True, seed=7, batch_size=4, **kwargs)
    other = generate_completions(gpt2, tokenizer, prompts, n_samples=3, do_sample=True, seed=8, batch_size=4, **kwargs)
    assert len(first) == 3 and all(len(samples) == 3 for samples in first)
    assert all(isinstance(s, str) for samples in first for s in samples)
    assert first == again
    assert first != other
    assert tokenizer.pad_token is None  # the shared tokenizer was not given a pad token


def test_left_padding_matches_unbatched(gpt2, tokenizer):
    prompts = ["x = 1\n", "def add(a, b):\n    return a + b\n\nfor i in range(3):\n"]
    kwargs = dict(max_new_tokens=8, progress=False, stop_sequences=())
    batched = generate_completions(gpt2, tokenizer, prompts, batch_size=2, **kwargs)
    alone = [generate_completions(gpt2, tokenizer, [p], batch_size=1, **kwargs)[0] for p in prompts]
    assert batched == alone


def test_stop_sequences_end_generation_early(gpt2, tokenizer):
    prompt = "def add(a, b):\n"
    free = generate_completions(gpt2, tokenizer, [prompt], max_new_tokens=24, progress=False, stop_sequences=())[0][0]
    assert len(free) > 4
    stop = free[2:4]  # a stop string the greedy continuation is known to produce
    counter = CountingForward(gpt2)
    try:
        cut = generate_completions(gpt2, tokenizer, [prompt], max_new_tokens=24, progress=False, stop_sequences=(stop,))[0][0]
    finally:
        counter.handle.remove()
    assert cut == free[: free.find(stop)]
    assert counter.calls < 24  # stopped by the criterion, not by max_new_tokens


def test_stop_sequences_in_the_prompt_are_ignored(gpt2, tokenizer):
    prompt = "x = 1\n# a comment\ny = 2\n"  # contains "\n#"
    kwargs = dict(max_new_tokens=6, progress=False)
    free = generate_completions(gpt2, tokenizer, [prompt], stop_sequences=(), **kwargs)
    assert "\n#" not in free[0][0]
    counter = CountingForward(gpt2)
    try:
        out = generate_completions(gpt2, tokenizer, [prompt], stop_sequences=("\n#",), **kwargs)
    finally:
        counter.handle.remove()
    assert out == free
    assert counter.calls == 6  # ran to max_new_tokens: the prompt's "\n#" did not stop it


def test_generation_input_errors(gpt2, tokenizer):
    with pytest.raises(ValueError, match="no prompts"):
        generate_completions(gpt2, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="do_sample"):
        generate_completions(gpt2, tokenizer, ["x"], n_samples=2, progress=False)


# --- evaluate_humaneval ----------------------------------------------------------------------


def test_evaluate_refuses_before_generating(monkeypatch):
    monkeypatch.delenv(ALLOW_CODE_EVAL_ENV, raising=False)
    with pytest.raises(CodeExecutionNotAllowedError):
        evaluate_humaneval(None, None)  # refused before the (absent) model is ever touched


def test_evaluate_argument_errors():
    with pytest.raises(ValueError, match="k="):
        evaluate_humaneval(None, None, n_samples=5, ks=(1, 10), allow_code_execution=True)
    with pytest.raises(ValueError, match="no problems"):
        evaluate_humaneval(None, None, problems=[], allow_code_execution=True)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_humaneval(None, None, n_samples=0, greedy=False, allow_code_execution=True)


@linux_only
def test_evaluate_humaneval_end_to_end(gpt2, tokenizer, few_problems):
    problems = few_problems[:2]
    result = evaluate_humaneval(
        gpt2, tokenizer, problems=problems, n_samples=2, max_new_tokens=6, batch_size=4,
        allow_code_execution=True, progress=False, timeout=2.0,
    )
    # A random model writes no working code.
    assert result["pass@1"] == 0.0 and result["greedy_pass@1"] == 0.0
    assert "pass@10" not in result  # default ks are capped at n_samples
    assert result["n_problems"] == 2
    settings = result["settings"]
    assert settings["n_samples"] == 2 and settings["ks"] == [1] and settings["max_new_tokens"] == 6
    assert settings["task_ids"] == [p["task_id"] for p in problems]
    assert [r["task_id"] for r in result["per_problem"]] == settings["task_ids"]
    assert all(r["correct"] == 0 and r["greedy_passed"] is False for r in result["per_problem"])


# --- execution-free locality -----------------------------------------------------------------


def _first_solution_token(tokenizer, ids, prompt):
    """Independently of offset mappings: the first token whose decoded prefix runs past the prompt."""
    for i in range(len(ids)):
        if len(tokenizer.decode(ids[: i + 1])) > len(prompt):
            return i
    return len(ids)


def _short_problems(tokenizer, count=3, limit=500):
    """Held-out problems that fit the tiny model's 512-token context."""
    chosen = [p for p in humaneval_problems("heldout")
              if len(tokenizer(p["prompt"] + p["canonical_solution"])["input_ids"]) <= limit]
    assert len(chosen) >= count
    return chosen[:count]


def test_canonical_nll_matches_a_hand_computation(gpt2, tokenizer):
    problems = _short_problems(tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for p in problems:
            full = tokenizer(p["prompt"] + p["canonical_solution"])["input_ids"]
            n_prompt = _first_solution_token(tokenizer, full, p["prompt"])
            assert 0 < n_prompt < len(full)
            logp = F.log_softmax(gpt2(torch.tensor([full])).logits[0].double(), dim=-1)
            for t in range(n_prompt, len(full)):
                total -= logp[t - 1, full[t]].item()
                count += 1
    expected = total / count
    got = canonical_nll(gpt2, tokenizer, problems, batch_size=2, progress=False)  # padding in play
    assert got == pytest.approx(expected, rel=1e-4)
    assert got == pytest.approx(canonical_nll(gpt2, tokenizer, problems, batch_size=1, progress=False), rel=1e-5)


def test_canonical_nll_llama(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer))
    problems = _short_problems(tokenizer, count=2)
    value = canonical_nll(model, tokenizer, problems, progress=False)
    assert math.isfinite(value) and value > 0


def test_canonical_nll_errors(gpt2, tokenizer):
    with pytest.raises(ValueError, match="no problems"):
        canonical_nll(gpt2, tokenizer, [], progress=False)


def test_next_token_kl(gpt2, tokenizer):
    prompts = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n", "x = [1, 2, 3]\n"]
    assert next_token_kl(gpt2, gpt2, tokenizer, prompts, progress=False) == 0.0
    assert next_token_kl(gpt2, copy.deepcopy(gpt2), tokenizer, prompts, batch_size=2, progress=False) == 0.0
    perturbed = copy.deepcopy(gpt2)
    with torch.no_grad():
        perturbed.transformer.h[-1].mlp.c_proj.weight.add_(0.5 * torch.randn_like(perturbed.transformer.h[-1].mlp.c_proj.weight))
    kl = next_token_kl(gpt2, perturbed, tokenizer, prompts, batch_size=2, progress=False)
    assert kl > 0
    # Token-weighted mean over positions: batching must not change it.
    assert kl == pytest.approx(next_token_kl(gpt2, perturbed, tokenizer, prompts, batch_size=1, progress=False), rel=1e-4)
    # By hand for one prompt: mean over positions of sum_v p (log p - log q).
    ids = torch.tensor([tokenizer(prompts[0])["input_ids"]])
    with torch.no_grad():
        logp = F.log_softmax(gpt2(ids).logits[0].double(), -1)
        logq = F.log_softmax(perturbed(ids).logits[0].double(), -1)
    by_hand = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    assert next_token_kl(gpt2, perturbed, tokenizer, prompts[:1], progress=False) == pytest.approx(by_hand, rel=1e-4)


def test_next_token_kl_with_a_peft_adapter(tokenizer):
    from peft import LoraConfig, get_peft_model

    prompts = ["def add(a, b):\n    return a + b\n", "x = 1\n"]
    base = make_model("gpt2", vocab_size=len(tokenizer))
    identity = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True))
    assert next_token_kl(identity, None, tokenizer, prompts, progress=False) == 0.0  # LoRA starts as a no-op
    edited = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True, init_lora_weights=False))
    kl = next_token_kl(edited, None, tokenizer, prompts, progress=False)
    assert kl > 0
    # Same number as comparing the untouched base model with the adapted one.
    assert kl == pytest.approx(next_token_kl(base, edited, tokenizer, prompts, progress=False), rel=1e-4)


def test_next_token_kl_errors(gpt2, tokenizer):
    with pytest.raises(ValueError, match="PeftModel"):
        next_token_kl(gpt2, None, tokenizer, ["x = 1\n"], progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        next_token_kl(gpt2, gpt2, tokenizer, [], progress=False)
    small = make_model("gpt2", vocab_size=len(tokenizer) + 8)
    with pytest.raises(ValueError, match="vocabulary"):
        next_token_kl(gpt2, small, tokenizer, ["x = 1\n"], progress=False)


@linux_only
@pytest.mark.slow
def test_every_canonical_solution_passes_in_the_sandbox():
    """No false negatives from the sandbox's restrictions (privilege drop, guard, limits)."""
    problems = humaneval_problems("all")
    result = score_completions(problems, [[p["canonical_solution"]] for p in problems],
                               allow_code_execution=True, progress=False, timeout=10.0)
    failures = {r["task_id"]: r["statuses"] for r in result["per_problem"] if r["correct"] != 1}
    assert failures == {}
