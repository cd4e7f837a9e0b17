#!/usr/bin/env python3
"""How two tokenizers align on the test samples, and what reading every prefix costs: Gemma-3-270m's tokens read
again by SmolLM2-135M (saemerge/retokenize.py), the pair of recipes/smollm2-x-gemma3-270m.yaml.

    python eval/zoo/prepare_pretrained.py                 # once
    python eval/tokenizer_alignment.py                    # ~3 minutes; eval/results/tokenizer_alignment.json

Per domain (the chunks of eval/tasks/sample.py, first 512 Gemma tokens of each):
- paired: the share of Gemma's positions (but 0) where SmolLM2's tokenization of the whole text ends at the same
  byte (the positions SAE training pairs);
- retokenized: the share of Gemma's positions t where SmolLM2 tokenizes the text up to t's end otherwise than as a
  prefix of its tokenization of the whole text (where reading the whole text once would leak the future);
- seconds: read_prefixes over the 512 positions against one SmolLM2 pass to the recipe's layer over the whole
  text (medians over the rows timed).
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "eval/tasks"))

import sample  # noqa: E402
from saemerge.hooks import run_to_layers  # noqa: E402
from saemerge.retokenize import Retokenizer, read_prefixes  # noqa: E402

LAYER = ["model.layers.10"]


def docs(domain: str) -> list[str]:
    with gzip.open(REPO / f"eval/data/{domain}/test.jsonl.gz", "rt") as f:
        rows = [json.loads(line)["text"] for line in f]
    return getattr(sample, domain)({"text": rows})["text"]


def main(timed_rows: int = 6):
    gemma = AutoTokenizer.from_pretrained(REPO / "models/gemma-3-270m-hf")
    smollm2 = AutoTokenizer.from_pretrained(REPO / "models/smollm2-135m-hf")
    model = AutoModelForCausalLM.from_pretrained(REPO / "models/smollm2-135m-hf").eval()
    retokenizer = Retokenizer(gemma, smollm2)
    results = {"threads": torch.get_num_threads()}
    for domain in ("prose", "code"):
        paired = retokenized = positions = 0
        read_s, pass_s = [], []
        for i, text in enumerate(docs(domain)):
            ids = gemma(text)["input_ids"][:512]
            whole = retokenizer.read([retokenizer.reference.spell(ids)])[0]
            _, ours, _ = retokenizer.pairs(ids)
            prefixes = retokenizer.read([retokenizer.reference.spell(ids[:t + 1]) for t in range(1, len(ids))])
            paired += len(ours)
            retokenized += sum(p != whole[:len(p)] for p in prefixes)
            positions += len(ids) - 1
            if i < timed_rows:
                start = time.perf_counter()
                read_prefixes(model, LAYER, retokenizer, torch.tensor([ids]), None, len(ids))
                read_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                with torch.no_grad():
                    run_to_layers(model, LAYER, torch.tensor([whole]))
                pass_s.append(time.perf_counter() - start)
        results[domain] = {"chunks": len(docs(domain)), "positions": positions, "paired": paired / positions,
                           "retokenized": retokenized / positions,
                           "read_prefixes_s": statistics.median(read_s), "one_pass_s": statistics.median(pass_s),
                           "ratio": statistics.median(read_s) / statistics.median(pass_s)}
        print(domain, results[domain], flush=True)
    out = REPO / "eval/results/tokenizer_alignment.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
