"""Score, locate and evaluate locality on a saved model; run under torchrun or plain python.

    torchrun --standalone --nproc_per_node 2 tests/scripts/distributed_job.py MODEL_DIR OUT.pt

Process 0 saves every result (and how the prompts were split) to ``OUT.pt`` for
tests/test_distributed.py to compare against a single-process run.
"""

import sys

import torch

from mg_editing.data import load_codegenbias
from mg_editing.distributed import gather_list, is_main_process, shard_bounds, shutdown, world_size
from mg_editing.locality import canonical_nll, generate_completions, humaneval_problems, score_completions
from mg_editing.locate import locate
from mg_editing.models import load_model_and_tokenizer
from mg_editing.scoring import fb_score, pronoun_probabilities

model_dir, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
model, tok = load_model_and_tokenizer(model_dir)
rows = load_codegenbias("dev").select(range(13)).to_list()  # 13: the processes get unequal blocks
prompts = [r["prompt"] for r in rows]
probs = pronoun_probabilities(model, tok, prompts, batch_size=4)
fb = fb_score(probs[:, 0], probs[:, 1], [r["fscore"] for r in rows])
locations = locate(model, tok, prompts, "neuron", top_k=3, neuron_top_k=5, batch_size=4, progress=False)
problems = humaneval_problems("heldout")[:5]
completions = generate_completions(model, tok, [p["prompt"] for p in problems], n_samples=2, do_sample=True,
                                   max_new_tokens=8, batch_size=3, progress=False)
canonical = [[p["canonical_solution"]] for p in problems]
executed = score_completions(problems, canonical, allow_code_execution=True, progress=False)
nll = canonical_nll(model, tok, problems, batch_size=2, progress=False)
blocks = gather_list([shard_bounds(len(prompts))])
if is_main_process():
    torch.save({
        "world_size": world_size(),
        "blocks": blocks,
        "probs": probs,
        "fb": fb["fb_score"],
        "meta": dict(locations.meta),
        "layer": locations.layer,
        "modules": list(locations.modules),
        "rows": {k: v.clone() for k, v in locations.rows.items()},
        "neurons": {k: v.clone() for k, v in locations.neurons.items()},
        "scores": {k: v.clone() for k, v in locations.scores.items()},
        "completions": completions,
        "pass@1": executed["pass@1"],
        "nll": nll,
    }, out)
shutdown()  # a clean exit for both ranks
