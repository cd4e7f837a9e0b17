#!/usr/bin/env python3
"""Soak a merged model with varied inputs, as a user would run it: tokenizer (truncation to the model's maximum
positions, padding) then the forward, and a share through `generate`.

    python eval/soak.py                                              # out/quickstart (made first if missing), 10,000 inputs
    python eval/soak.py --model out/gemma3-270m-general-x-code --limit 1000 --max-length 256 --max-batch 4

Input kinds: empty strings, whitespace, one token, exactly the maximum length, far past the context (cut by the
tokenizer), unusual Unicode (emoji, RTL, combining marks, control characters, NUL, lone surrogates escaped),
prose and code from the test splits, random bytes decoded with errors='replace'. Batches of 1..16 inputs, half
of one kind and half mixed, padded left or right. Every call's logits must be finite at the real (unpadded)
positions; exceptions are caught and recorded with the kinds in the batch. Appends to eval/results/soak.json.

Long runs (1,000 inputs of up to 16 x 512 tokens on Gemma take hours on a CPU) save their state after every call
to OUTPUT.MODEL.partial (counts, records, both random generators' states, and a hash of saemerge's code); `--resume`
goes on from there with the same inputs an uninterrupted run would draw, and refuses if the arguments or the
code changed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import platform
import random
import resource
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import saemerge  # noqa: F401  (registers the merged model class)
from saemerge.cli import main as saemerge_main
from saemerge.files import write_atomic

REPO = Path(__file__).resolve().parent.parent
KINDS = ["empty", "whitespace", "one_token", "max_length", "far_too_long", "unicode", "prose", "code", "random_bytes"]
ODD = ["🙂", "👩‍👩‍👧‍👦", "🏳️‍🌈", "שלום עולם", "مرحبا بالعالم", "\u202eevil\u202c", "e\u0301\u0302\u0303", "Z̴̡̛a̷l̸g̵o̶",
       "\x00", "\x01\x02\x1b[31m", "\x7f", "\ufeff", "\u200b\u200d", "漢字かなカナ", "∀x∈ℝ: x²≥0", "\r\n\t\v\f",
       "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace"),  # a lone surrogate, escaped
       "\udfff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "\U0010ffff", "ǅ", "ﬁ", "Ⅻ", "𝔘𝔫𝔦"]


def documents(domain: str) -> list[str]:
    with gzip.open(REPO / f"eval/data/{domain}/test.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for line in f]


class Inputs:
    """Texts of each kind, drawn from one seeded generator."""

    def __init__(self, tokenizer, max_length: int, seed: int):
        self.rng = random.Random(seed)
        self.tok, self.max_length = tokenizer, max_length
        self.docs = {"prose": documents("prose"), "code": documents("code")}
        self.vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]

    def excerpt(self, domain: str, chars: int) -> str:
        doc = self.rng.choice(self.docs[domain])
        start = self.rng.randrange(max(1, len(doc) - chars))
        return doc[start:start + chars]

    def long_text(self, tokens: int) -> str:
        """Prose and code pieces until the text has at least `tokens` tokens."""
        text = ""
        while len(self.tok(text, add_special_tokens=False)["input_ids"]) < tokens:
            text += self.excerpt(self.rng.choice(["prose", "code"]), 4 * tokens) + "\n"
        return text

    def make(self, kind: str) -> str:
        r = self.rng
        if kind == "empty":
            return ""
        if kind == "whitespace":
            return "".join(r.choice(" \n\t") for _ in range(r.randint(1, 40)))
        if kind == "one_token":
            return self.tok.decode([r.choice(self.vocab)])
        if kind == "max_length":  # at least the maximum: truncation leaves exactly max_length tokens
            return self.long_text(self.max_length)
        if kind == "far_too_long":
            return self.long_text(self.max_length * r.randint(3, 20))
        if kind == "unicode":
            return "".join(r.choice(ODD + [" ", "a"]) for _ in range(r.randint(1, 60)))
        if kind in ("prose", "code"):
            return self.excerpt(kind, r.randint(1, 2000))
        return bytes(r.randrange(256) for _ in range(r.randint(1, 600))).decode("utf-8", errors="replace")


def max_positions(model) -> int:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions")


@torch.no_grad()
def forward(model, batch) -> dict:
    """One forward; non-finite logits at real positions (padding excluded) and the shape are checked."""
    out = model(**batch)
    mask = batch["attention_mask"].bool()
    assert out.logits.shape[:2] == batch["input_ids"].shape, f"logits {tuple(out.logits.shape)}"
    # A few positions at a time: isfinite makes float temporaries the size of its input (at 16 x 512 on Gemma,
    # checking all logits at once took the process from 11.6 to 23.1 GiB, more than the merge's own forward).
    nonfinite = sum(int((~torch.isfinite(part)).any(-1)[where].sum())
                    for part, where in zip(out.logits.split(16, dim=1), mask.split(16, dim=1)))
    return {"nonfinite": nonfinite}


@torch.no_grad()
def generate(model, batch, new_tokens: int, pad_id: int, bos_id: int) -> dict:
    """Greedy generation; the raw logits of every new token must be finite (the processed scores hold -inf on
    purpose: min_new_tokens bans EOS). A batch of empty prompts starts from BOS,
    as generate does without input (transformers' own models fail on a [B, 0] prompt too)."""
    if batch["input_ids"].shape[1] == 0:
        batch = {"input_ids": torch.full((len(batch["input_ids"]), 1), bos_id),
                 "attention_mask": torch.ones(len(batch["input_ids"]), 1, dtype=torch.long)}
    out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (len(batch["input_ids"]), batch["input_ids"].shape[1] + new_tokens)
    return {"nonfinite": int(sum((~torch.isfinite(step)).any(-1).sum() for step in out.logits))}


def code_hash() -> str:
    """sha256 of saemerge's source files: a resumed soak must test the code it started on."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "saemerge").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def as_state(state: list) -> tuple:
    """random.getstate() back from its JSON form (lists for tuples)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="out/quickstart", help="merged model folder")
    parser.add_argument("--limit", type=int, default=10_000, help="number of inputs (texts)")
    parser.add_argument("--max-length", type=int, help="truncate to this many tokens (default: the model's maximum positions)")
    parser.add_argument("--max-batch", type=int, default=16, help="batch sizes are 1..this (Gemma's 262k-token vocabulary "
                        "makes 16 x 512 logits 8.6 GB, several times over in a router merge)")
    parser.add_argument("--generate-share", type=float, default=0.1, help="share of calls that go through generate")
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens generated per generate call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "eval/results/soak.json"))
    parser.add_argument("--resume", action="store_true", help="go on from OUTPUT.MODEL.partial, where a stopped run left off")
    args = parser.parse_args()
    partial = Path(f"{args.output}.{Path(args.model).name}.partial")  # one per model: runs on two can interleave
    same = {k: getattr(args, k) for k in ("model", "limit", "max_length", "max_batch", "generate_share", "new_tokens",
                                          "seed")}
    same["code"] = code_hash()
    state = None
    if args.resume:
        if not partial.exists():
            parser.error(f"--resume: {partial} does not exist (nothing to resume)")
        state = json.loads(partial.read_text())
        changed = [k for k, v in same.items() if state["same"][k] != v]
        if changed:
            parser.error(f"--resume: {partial} was made with other {', '.join(changed)}: delete it to start again")
    elif partial.exists():
        parser.error(f"{partial} exists (a stopped run): pass --resume to go on, or delete it to start again")
    transformers.logging.set_verbosity_error()  # right padding in generate warns on every call; it is on purpose

    if not Path(args.model).exists() and args.model == "out/quickstart":
        print("out/quickstart does not exist: running the quickstart merge first (about 3.5 minutes)")
        assert saemerge_main(["merge", "recipes/quickstart.yaml", "--overwrite", "--no-eval"]) == 0
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    max_length = args.max_length or max_positions(model)
    inputs = Inputs(tokenizer, max_length, args.seed)
    rng = random.Random(args.seed + 1)

    counts, calls, lengths = Counter(), Counter(), Counter()
    nonfinite, exceptions, segments = [], [], []
    done, before = 0, 0.0  # inputs done and seconds spent by earlier segments of a resumed run
    if state:
        counts, calls = Counter(state["counts"]), Counter(state["calls"])
        lengths = Counter({int(k): v for k, v in state["lengths"].items()})
        nonfinite, exceptions, segments = state["nonfinite"], state["exceptions"], state["segments"]
        done, before = state["done"], sum(s["seconds"] for s in segments)
        inputs.rng.setstate(as_state(state["inputs_rng"]))
        rng.setstate(as_state(state["rng"]))
        print(f"resuming at {done} inputs, {calls.total()} calls")
    segments.append({"inputs_from": done, "seconds": 0.0})
    start = time.perf_counter()
    while done < args.limit:
        size = min(rng.randint(1, args.max_batch), args.limit - done)
        kinds = [rng.choice(KINDS)] * size if rng.random() < 0.5 else [rng.choice(KINDS) for _ in range(size)]
        texts = [inputs.make(kind) for kind in kinds]
        via = "generate" if rng.random() < args.generate_share else "forward"
        tokenizer.padding_side = rng.choice(["left", "right"])
        # generate needs room for its new tokens inside the context
        limit = max_length - args.new_tokens if via == "generate" else max_length
        record = {"kinds": sorted(set(kinds)), "via": via, "batch": size, "padding": tokenizer.padding_side}
        try:
            batch = dict(tokenizer(texts, truncation=True, max_length=limit, padding=True, return_tensors="pt"))
            record["tokens"] = batch["input_ids"].shape[1]
            result = (generate(model, batch, args.new_tokens, tokenizer.pad_token_id, bos_id) if via == "generate"
                      else forward(model, batch))
            if result["nonfinite"]:
                nonfinite.append({**record, "rows": result["nonfinite"]})
            if "max_length" in kinds and via == "forward":
                assert record["tokens"] == max_length, f"max_length input gave {record['tokens']} tokens"
        except Exception as e:  # recorded, not fatal: the soak counts them
            exceptions.append({**record, "error": f"{type(e).__name__}: {str(e)[:300]}",
                               "where": traceback.format_exc().strip().splitlines()[-3][:300]})
        counts.update(kinds)
        calls[via] += 1
        lengths[record.get("tokens", -1)] += 1
        done += size
        segments[-1].update(inputs_to=done, seconds=round(time.perf_counter() - start, 1), peak_rss_gib=peak_rss_gib())
        write_atomic(partial, json.dumps({
            "same": same, "done": done, "counts": counts, "calls": calls, "lengths": lengths, "nonfinite": nonfinite,
            "exceptions": exceptions, "segments": segments, "inputs_rng": inputs.rng.getstate(), "rng": rng.getstate()}))
        if calls.total() % 10 == 0:
            print(f"{done:6d} inputs, {calls.total()} calls, {len(nonfinite)} non-finite, {len(exceptions)} exceptions, "
                  f"{before + time.perf_counter() - start:.0f}s", flush=True)
    wall = before + time.perf_counter() - start

    result = {
        "model": args.model, "inputs": done, "max_length": max_length, "max_batch": args.max_batch, "seed": args.seed,
        "inputs_per_kind": dict(sorted(counts.items())), "calls": dict(calls), "calls_total": calls.total(),
        "calls_at_max_length": lengths[max_length], "calls_with_empty_batch": lengths[0],
        "nonfinite": nonfinite, "exceptions": exceptions, "wall_seconds": round(wall, 1), "segments": segments,
        "code": same["code"],
        "peak_rss_gib": max(s["peak_rss_gib"] for s in segments),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}",
    }
    output = Path(args.output)
    rows = json.loads(output.read_text()) if output.exists() else []
    rows = [r for r in rows if not (r["model"] == args.model and r["inputs"] == done)] + [result]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    partial.unlink(missing_ok=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("nonfinite", "exceptions")}, indent=2))
    print(f"non-finite: {len(nonfinite)}, exceptions: {len(exceptions)}")


if __name__ == "__main__":
    main()
