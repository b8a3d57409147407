"""Load CodeGenBias with `datasets.load_dataset` (the Hub repo folder) and check Table II.

    python examples/load_codegenbias.py [--path hub_dataset/codegenbias]
"""

import argparse
import collections

from datasets import load_dataset

parser = argparse.ArgumentParser()
parser.add_argument("--path", default="hub_dataset/codegenbias", help="the Hub repo id or a local copy")
args = parser.parse_args()

ds = load_dataset(args.path)
sizes = {split: len(ds[split]) for split in ds}
print(sizes)
print(collections.Counter(ds["train"]["category"]))
print(ds["test"][0]["prompt"])
assert sizes == {"train": 555, "dev": 277, "test": 3328}
