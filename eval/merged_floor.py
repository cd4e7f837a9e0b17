#!/usr/bin/env python3
"""Merged inference against its floor: the parts it cannot skip, timed one by one in the same run.

    python eval/merged_floor.py --batch 4 --seq 128 --new-tokens 16 --repeats 5      # the quickstart merge
    python eval/merged_floor.py --model out/gemma3-270m-general-x-code --batch 1 --seq 64 --new-tokens 8 --repeats 3

floor = the single-pass bound: every receiver's full forward + every other sender's forward up to its last layer
(run_to_layers) + the SAE work (encode each sender's residual, and each receiver's own under combine "mean";
decode into each receiver): each source's blocks once. Also timed, outside the floor: `injected`
(model.bridge.receive per receiver and site: code mixing, gates, decode) and `mix` (each head's softmax,
the router, the mixture). Each part runs on the same B x T tokens (starts of test documents, alternately prose
and code, no padding). Generation: greedy model.generate of N tokens with the cache from the first T - N
tokens; its floor parts replay the same tokens (teacher-forced), each with its own DynamicCache, and so does
`merged loop` (model forward with a MergedCache, without generate). Both the saved heads mode and heads
"target" are timed; repeats are interleaved, medians (and minima) reported. Appends to eval/results/merged_floor.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import saemerge  # noqa: F401  (registers the merged model class)
from saemerge.hooks import run_to_layers
from saemerge.cache import cache_argument
from saemerge.heads import mix_heads
from saemerge.sae_bridge import scaled_residuals
from saemerge.wiring import receivers as receivers_of, senders_to

REPO = Path(__file__).resolve().parent.parent


def token_batch(tokenizer, batch: int, seq: int) -> torch.Tensor:
    """[batch, seq]: the first seq tokens of test documents at least that long, alternately prose and code."""
    docs = {}
    for domain in ("prose", "code"):
        with gzip.open(REPO / f"eval/data/{domain}/test.jsonl.gz", "rt") as f:
            ids = (tokenizer(json.loads(line)["text"])["input_ids"] for line in f)
            docs[domain] = [x[:seq] for x in ids if len(x) >= seq]
    return torch.tensor([docs[("prose", "code")[i % 2]][i // 2] for i in range(batch)])


def parts(model, steps: list[tuple], cache: bool) -> dict:
    """name -> callable: the merged model and each part of its floor, run over `steps` [(ids, mask, positions)]
    (one step without cache; prefill then one token per step with it)."""
    cfg = model.config
    names, sites = cfg.names, range(cfg.n_sites)
    receivers = receivers_of(cfg)
    senders = sorted({a for r in receivers for a in senders_to(cfg, r)}, key=names.index) if cfg.scale else []
    fed = [r for r in receivers if senders and senders_to(cfg, r)]  # receivers that get features
    encoded = [n for n in names if n in senders or (n in fed and cfg.combine == "mean")]

    def kwargs(step, past, takes_cache="cache"):
        ids, mask, positions = step
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": cache,
                **({takes_cache: past} if cache else {})}

    def new_cache(name):
        return DynamicCache(config=model.sources[name].config.get_text_config(decoder=True)) if cache else None

    def full(name):  # with the cache (generation) the last position's logits only, as generate asks
        past, keep = new_cache(name), {"logits_to_keep": 1} if cache else {}
        return [model.sources[name](**kwargs(s, past, cache_argument(model.sources[name])), **keep).logits
                for s in steps]

    def partial(name):
        past = new_cache(name)
        return [run_to_layers(model.sources[name], model.layers[name], **kwargs(s, past, cache_argument(model.sources[name])))
                for s in steps]

    def merged():
        past = model.new_cache() if cache else None
        return [model(**kwargs(s, past)).logits for s in steps]

    # Inputs of the SAE and head timings, made once: residuals [step][site] and logits [step] per source.
    res = {n: partial(n) for n in names}
    logits = {n: full(n) for n in names} if cfg.heads != "target" else {}
    codes = [[{n: model.saes[s][n].encode(res[n][i][s]) for n in encoded} for s in sites]
             for i in range(len(steps))]

    def sae():
        for i in range(len(steps)):
            for s in sites:
                z = {n: model.saes[s][n].encode(res[n][i][s]) for n in encoded}
                for r in fed:
                    model.saes[s][r].decode(z[senders_to(cfg, r)[0]], bias=False)

    def injected():
        for i in range(len(steps)):
            for s in sites:
                for r in fed:
                    model.bridge.receive(r, s, res[r][i][s], codes[i][s], {n: res[n][i][s] for n in names})

    def mix():  # as SAEMergedForCausalLM.forward mixes the heads
        for i in range(len(steps)):
            if cfg.heads == "router":
                last = {n: res[n][i][-1] for n in names}
                weights = model.router(scaled_residuals(model.saes[-1], names, last, model.router)).log_softmax(-1)
            else:
                weights = torch.full((*logits[names[0]][i].shape[:-1], len(names)), -math.log(len(names)))
            kept = logits[names[0]][i].shape[1]  # the last position only, in generation
            mix_heads(weights[:, -kept:], [logits[n][i] for n in names])

    fns = {"merged": merged, **{f"full:{r}": (lambda r=r: full(r)) for r in receivers},
           **{f"partial:{a}": (lambda a=a: partial(a)) for a in senders if a not in receivers}, "sae": sae}
    if fed:
        fns["injected"] = injected
    if cfg.heads != "target":
        fns["mix"] = mix
    return fns


def summary(times: dict, merged: str) -> dict:
    """Floor and ratio from the medians; the same from the minima as well (on a shared machine others' work only
    adds time, so the minima are the less disturbed estimate). `ratio_with_mix`: against the floor plus `mix`,
    the work a merge that mixes heads must do on top of it (no source normalises or mixes distributions)."""
    r = {"seconds": times}
    for stat, f in (("median", statistics.median), ("min", min)):
        t = {k: f(v) for k, v in times.items()}
        floor = sum(v for k, v in t.items() if k.startswith(("full:", "partial:")) or k == "sae")
        r[stat] = {"parts": t, "floor": floor, "ratio": t[merged] / floor,
                   "ratio_with_mix": t[merged] / (floor + t.get("mix", 0))}
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="out/quickstart", help="merged model folder")
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (must fit the context)")
    parser.add_argument("--new-tokens", type=int, default=16, help="generated tokens, after a prompt of seq - these")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(REPO / "eval/results/merged_floor.json"))
    args = parser.parse_args()
    wall = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    ids = token_batch(tokenizer, args.batch, args.seq)
    B, T, N = args.batch, args.seq, args.new_tokens
    assert 0 < N < T, "--new-tokens must be below --seq"
    assert model.config.target in model.config.names, "config.target names no source"

    results = {}
    for heads in dict.fromkeys([model.config.heads, "target"]):
        model.config.heads = heads
        prompt = ids[:, :T - N]
        generate = lambda: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),  # noqa: E731
                                          max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=True)
        out = generate()
        P = T - N
        steps = [(prompt, torch.ones_like(prompt), torch.arange(P).expand(B, P))] + [
            (out[:, P + i - 1:P + i], torch.ones(B, P + i, dtype=torch.long), torch.full((B, 1), P + i - 1))
            for i in range(1, N)]
        fns = {**{f"forward/{k}": f for k, f in parts(model, [(ids, torch.ones_like(ids), None)], False).items()},
               **{f"generate/{k}": f for k, f in parts(model, steps, True).items()}}
        fns["generate/merged loop"] = fns.pop("generate/merged")
        fns["generate/merged"] = generate
        for fn in fns.values():  # warm-up
            fn()
        replayed = torch.stack([x[:, -1].argmax(-1) for x in fns["generate/merged loop"]()], 1)
        same = torch.equal(replayed, out[:, P:])  # the replayed steps are those generate took
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
        results[heads] = {}
        for kind in ("forward", "generate"):
            r = summary({k.split("/", 1)[1]: v for k, v in times.items() if k.startswith(kind + "/")}, "merged")
            if kind == "generate":
                r["median"]["ratio_loop"] = r["median"]["parts"]["merged loop"] / r["median"]["floor"]
                r["per_step_ms_median"] = {k: 1000 * v / N for k, v in r["median"]["parts"].items()}
            results[heads][kind] = r
        results[heads]["generate"]["loop_matches_generate"] = same

    record = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "args": vars(args),
        "sources": model.config.names, "target": model.config.target, "scale": model.config.scale,
        "combine": model.config.combine, "gates": model.config.gates, "tokens": [B, T], "prompt_tokens": T - N,
        "results": results, "wall_seconds": time.perf_counter() - wall,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "threads": torch.get_num_threads()},
    }
    output = Path(args.output)
    rows = json.loads(output.read_text()) if output.exists() else []
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(rows + [record], indent=2) + "\n")

    print(f"{args.model}: {B} x {T} tokens; generate {N} after {T - N} (ms; median of {args.repeats}, then min)")
    print(f"{'heads':8} {'run':8} {'stat':6} {'merged':>8} {'floor':>8} {'ratio':>5} {'+mix':>5}  parts")
    for heads, by_kind in results.items():
        for kind in ("forward", "generate"):
            for stat in ("median", "min"):
                r = by_kind[kind][stat]
                rest = "  ".join(f"{k} {1000 * v:.1f}" for k, v in r["parts"].items() if k != "merged")
                print(f"{heads:8} {kind:8} {stat:6} {1000 * r['parts']['merged']:8.1f} {1000 * r['floor']:8.1f} "
                      f"{r['ratio']:5.2f} {r['ratio_with_mix']:5.2f}  {rest}")
    print(f"wall {record['wall_seconds']:.0f} s; appended to {output}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
