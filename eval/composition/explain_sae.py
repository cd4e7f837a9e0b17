#!/usr/bin/env python3
"""What the SAE bridge carries: which shared latents bring a held-out key's number from K into S, what they are
in K, and whether they are the latents that code plain numbers in S.

    python eval/composition/explain_sae.py eval/composition/runs/merges/sae-end-to-end

1. Attribution: for problems over held-out keys, gradient x code of the log-probability of the answer's first
   token with respect to K's code at the key's position (the code the bridge sends). Latents ranked by the mean
   attribution; the share of the total that the top ones carry.
2. In K: each top latent's activation at the key's position over all keys (in "KEY + 1 0 ="), grouped by the
   key's number: the digit (tens, units) it prefers, how selective it is, its top keys and their numbers.
3. In S: the same latent of S's SAE at the first operand's last digit of plain problems ("N + 1 0 =") for every
   N: does it fire on plain numbers, and on the same digit? That is the claim of a shared latent space.
Writes explain_sae.json beside the model and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data import NUMBERS, Task, spaced  # noqa: E402

from saemerge.hooks import run_to_layers  # noqa: E402


def ids_of(tokenizer, prompt: str) -> torch.Tensor:
    return torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])


def attributions(model, tokenizer, examples, site: int = 0) -> torch.Tensor:
    """Mean over examples of gradient x code at the key's position (position 1, right after <s>): [d_sae]."""
    bridge, k_layers = model.bridge, model.layers["K"]
    send = bridge.send
    total = 0
    for e in examples:
        ids = ids_of(tokenizer, e.prompt)
        answer = tokenizer(e.answer, add_special_tokens=False)["input_ids"][0]
        with torch.no_grad():
            h = run_to_layers(model.sources["K"], k_layers, ids)[site]
        code = bridge.saes[site]["K"].encode(h).requires_grad_(True)
        bridge.send = lambda s, residuals, step=None, code=code: {"K": code} if s == site else send(s, residuals, step)
        try:
            logp = model(ids).logits[0, -1].log_softmax(-1)[answer]
            (grad,) = torch.autograd.grad(logp, code)
        finally:
            bridge.send = send
        total = total + (grad * code)[0, 1].detach()
    return total / len(examples)


@torch.no_grad()
def codes_at(model, source: str, tokenizer, prompts: list[str], position: int, site: int = 0) -> torch.Tensor:
    """Codes of `source`'s SAE at one position of each prompt: [prompts, d_sae]."""
    sae = model.bridge.saes[site][source]
    rows = [sae.encode(run_to_layers(model.sources[source], model.layers[source], ids_of(tokenizer, p))[site])[0, position]
            for p in prompts]
    return torch.stack(rows)


def digit_preference(acts: torch.Tensor, numbers: list[int]) -> dict:
    """Which tens / units digit a latent's activation prefers, and how much of its mass sits there."""
    out = {}
    for name, digit in (("tens", lambda n: abs(n) // 10), ("units", lambda n: abs(n) % 10)):
        means = torch.zeros(10)
        for d in range(10):
            picked = [a for a, n in zip(acts.tolist(), numbers) if digit(n) == d]
            means[d] = sum(picked) / max(1, len(picked))
        out[name] = {"digit": int(means.argmax()), "share": round(float(means.max() / means.sum().clamp_min(1e-9)), 3)}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("merged", type=Path, help="a merged model folder with bridge: sae (K -> S)")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    task = Task(args.keys, args.seed)
    tokenizer = task.tokenizer()
    model = AutoModelForCausalLM.from_pretrained(args.merged).eval().requires_grad_(False)
    # Plain "KEY + N =" problems over held-out keys (the first template), so the key sits at position 1.
    examples = [e for e in task.eval_set("test", 4 * args.examples) if e.prompt.split()[0] == e.key][:args.examples]
    attribution = attributions(model, tokenizer, examples)
    top = attribution.abs().argsort(descending=True)[:args.top]
    keys = task.keys
    k_codes = codes_at(model, "K", tokenizer, [f"{k} + 1 0 =" for k in keys], 1)
    numbers = list(NUMBERS)
    # S sees "N + 1 0 =": the first operand's last digit sits at position 1 (one digit) or 2 (two digits).
    s_codes = torch.stack([codes_at(model, "S", tokenizer, [f"{spaced(n)} + 1 0 ="], len(str(n)))[0] for n in numbers])
    values = [task.values[k] for k in keys]
    latents = []
    for j in top.tolist():
        k_act, s_act = k_codes[:, j], s_codes[:, j]
        best = k_act.argsort(descending=True)[:5].tolist()
        latents.append({
            "latent": j, "attribution": round(float(attribution[j]), 4),
            "share_of_attribution": round(float(attribution[j].abs() / attribution.abs().sum()), 3),
            "K_fires_on_keys": round(float((k_act > 0).float().mean()), 3),
            "K_top_keys": [[keys[i], values[i]] for i in best], "K_prefers": digit_preference(k_act, values),
            "S_fires_on_numbers": round(float((s_act > 0).float().mean()), 3),
            "S_top_numbers": s_act.argsort(descending=True)[:5].tolist() if s_act.max() > 0 else [],
            "S_prefers": digit_preference(s_act, numbers) if s_act.max() > 0 else None})
    shared = [l for l in latents if l["S_fires_on_numbers"] > 0]
    agree = [l for l in shared if any(l["K_prefers"][p]["digit"] == l["S_prefers"][p]["digit"] for p in ("tens", "units"))]
    summary = {"examples": len(examples), "top": args.top,
               "top_share_of_attribution": round(sum(l["share_of_attribution"] for l in latents), 3),
               "top_latents_firing_on_plain_numbers_in_S": len(shared),
               "of_those_preferring_a_same_digit": len(agree), "latents": latents}
    (args.merged / "explain_sae.json").write_text(json.dumps(summary, indent=2))
    print(f"top {args.top} latents carry {summary['top_share_of_attribution']:.0%} of the attribution; "
          f"{len(shared)} fire on plain numbers in S, {len(agree)} of them on a same digit as in K")
    print("latent  attribution  K: fires  prefers(tens,units)  top keys (number)        S: fires  prefers  top numbers")
    for l in latents:
        kp, sp = l["K_prefers"], l["S_prefers"]
        print(f"{l['latent']:6d}  {l['attribution']:+.4f}     {l['K_fires_on_keys']:.2f}     "
              f"{kp['tens']['digit']}x ({kp['tens']['share']:.2f}), x{kp['units']['digit']} ({kp['units']['share']:.2f})  "
              f"{', '.join(f'{k}({v})' for k, v in l['K_top_keys'][:3]):24s} {l['S_fires_on_numbers']:.2f}     "
              + (f"{sp['tens']['digit']}x, x{sp['units']['digit']}   {l['S_top_numbers']}" if sp else "-"))


if __name__ == "__main__":
    main()
