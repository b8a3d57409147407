"""Locate the bias, wrap the model in an MG-Edit row adapter, edit it, and save the adapter.

    python examples/locate_and_edit.py [--model demo] [--out row-adapter] [--steps 100]
"""

import argparse

from peft import get_peft_model

from mg_editing import MGEditConfig, edit, load_codegenbias, load_model_and_tokenizer, locate, score_dataset

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="demo")
parser.add_argument("--out", default="row-adapter")
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--locate-split", default="train+dev")
args = parser.parse_args()

model, tokenizer = load_model_and_tokenizer(args.model)
dev = load_codegenbias("dev")
before = score_dataset(model, tokenizer, dev).fb_score

locations = locate(model, tokenizer, load_codegenbias(args.locate_split), granularity="row")
print(locations)
peft_model = get_peft_model(model, MGEditConfig(granularity="row", locations=locations))
peft_model.print_trainable_parameters()
result = edit(peft_model, tokenizer, load_codegenbias("train"), dev_dataset=dev, steps=args.steps, eval_every=10)
after = score_dataset(peft_model, tokenizer, dev).fb_score
print(f"dev FB-Score: {before:.4f} -> {after:.4f} (best step {result.best_step})")
peft_model.save_pretrained(args.out)
assert after <= before
