#!/usr/bin/env python3
"""The real-model case, step one: which of the benchmark's skills does a pretrained model actually have?

    python eval/zoo/prepare_pretrained.py --only smollm2-135m
    python eval/composition/real_skill.py models/smollm2-135m-hf

Greedy exact match, few-shot (3 solved examples before each problem, one per line), numbers written as usual
(the model's own tokenizer splits them):
- arithmetic: the benchmark's plain problems (a number 0-99 plus or minus 1, 2, 10 or 20, three templates),
- copy: "the number is 37 . the number again : 37", a number 0-99 written back.
Writes eval/results/composition_real_skill.json (one entry per model, kept across runs).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data import Task  # noqa: E402


def plain(text: str) -> str:
    """'3 7 + 2 0 =' -> '37 + 20 =', '- 8' -> '-8': numbers written as usual."""
    return re.sub(r"^- ", "-", re.sub(r"(?<=\d) (?=\d)", "", text))


def problems(kind: str, n: int, seed: str) -> list[tuple[str, str]]:
    task, rng = Task(), random.Random(seed)
    if kind == "arithmetic":
        return [(plain(e.prompt), plain(e.answer)) for e in (task.arithmetic(rng) for _ in range(n))]
    return [(f"the number is {v} . the number again :", str(v)) for v in (rng.randrange(100) for _ in range(n))]


@torch.no_grad()
def exact_match(model, tokenizer, kind: str, n: int, shots: int = 3) -> float:
    examples = problems(kind, shots, f"{kind}-shots")
    prefix = "".join(f"{p} {a}\n" for p, a in examples)
    right = 0
    for prompt, answer in problems(kind, n, f"{kind}-test"):
        ids = tokenizer(prefix + prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        given = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        number = re.match(r"\s*(-?\d+)", given)
        right += number is not None and number.group(1) == answer
    return right / n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a pretrained model folder (transformers format)")
    parser.add_argument("--n", type=int, default=200, help="problems per skill")
    parser.add_argument("--output", type=Path, default=HERE.parent / "results" / "composition_real_skill.json")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    start = time.time()
    scores = {kind: exact_match(model, tokenizer, kind, args.n) for kind in ("arithmetic", "copy")}
    digits = tokenizer.tokenize(" 1234")
    result = json.loads(args.output.read_text()) if args.output.exists() else {}
    result[args.model.name] = {**scores, "n": args.n, "shots": 3, "tokens of ' 1234'": digits,
                               "seconds": round(time.time() - start)}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result[args.model.name]))


if __name__ == "__main__":
    main()
