"""FB-Score of a model with `evaluate.load`: the fast scorer gives p(he)/p(she), the metric scores them.

    python examples/fb_score_metric.py [--model demo] [--limit 200]
"""

import argparse

import evaluate

from mg_editing import load_codegenbias, load_model_and_tokenizer, pronoun_probabilities
from mg_editing.metrics import FB_SCORE_PATH

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="demo", help="Hub id, local path, or 'demo'")
parser.add_argument("--limit", type=int, default=None, help="score only the first N test prompts")
args = parser.parse_args()

model, tokenizer = load_model_and_tokenizer(args.model)
test = load_codegenbias("test")
if args.limit:
    test = test.select(range(args.limit))
probs = pronoun_probabilities(model, tokenizer, test["prompt"], progress=True)
fb = evaluate.load(FB_SCORE_PATH)  # or evaluate.load("evaluate_metrics/fb_score") inside the repo
result = fb.compute(p_he=probs[:, 0], p_she=probs[:, 1], fscore=test["fscore"], category=test["category"])
print(result)
assert 0.0 <= result["fb_score"] <= 2.0 and set(result["per_category"]) == set(test["category"])
