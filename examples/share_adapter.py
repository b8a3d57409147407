"""Load a saved MG-Edit adapter with `PeftModel.from_pretrained`, merge it, and (optionally) push it.

    python examples/share_adapter.py --adapter row-adapter [--model demo] [--push-to-hub you/codegen-mg-edit-row]

The adapter argument may be a local folder or a Hub repo id.
"""

import argparse

import torch
from peft import PeftModel

import mg_editing  # noqa: F401  (registers the MG_EDIT adapter type with PEFT)
from mg_editing import load_model_and_tokenizer, pronoun_probabilities
from mg_editing.hub import push_adapter

parser = argparse.ArgumentParser()
parser.add_argument("--adapter", required=True, help="adapter folder or Hub repo id")
parser.add_argument("--model", default="demo", help="the base model the adapter was made for")
parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
args = parser.parse_args()

base, tokenizer = load_model_and_tokenizer(args.model)
model = PeftModel.from_pretrained(base, args.adapter).eval()
prompts = mg_editing.load_codegenbias("dev")["prompt"][:16]
with_adapter = pronoun_probabilities(model, tokenizer, prompts)
merged = model.merge_and_unload()  # a plain transformers model with the edit folded in
after_merge = pronoun_probabilities(merged, tokenizer, prompts)
print("max |p(adapter) - p(merged)| =", float((with_adapter - after_merge).abs().max()))
assert torch.allclose(with_adapter, after_merge, atol=1e-5)
if args.push_to_hub:
    print(push_adapter(args.adapter, args.push_to_hub))
