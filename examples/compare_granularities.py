"""Compare MG-Editing at several granularities in one Table V report (no code execution).

    python examples/compare_granularities.py [--model demo] [--granularities row,neuron] [--out runs/compare]
"""

import argparse

from mg_editing import EditConfig, RunSettings, run_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="demo")
parser.add_argument("--granularities", default="module,row,neuron")
parser.add_argument("--out", default="runs/compare")
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--score-stride", type=int, default=1)
parser.add_argument("--locate-split", default="train+dev")
args = parser.parse_args()

settings = RunSettings(
    granularities=tuple(args.granularities.split(",")),
    edit=EditConfig(steps=args.steps, eval_every=10),
    humaneval_limit=8, score_stride=args.score_stride, locate_split=args.locate_split,
)
paths = run_pipeline(args.model, args.out, settings)
report = paths["markdown"].read_text()
print(report)
assert all(f"{g} granularity" in report for g in settings.granularities)
