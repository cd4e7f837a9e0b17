#!/usr/bin/env python3
"""Train the composition benchmark's models from scratch: K (knowledge), S (skill) and J (joint reference).

    python eval/composition/train_models.py K S J --output eval/composition/runs

A small GPT-2 each (4 blocks, width 128, 4 heads) on the shared word-level tokenizer, AdamW with warm-up
and cosine decay, batches of 128 rows x 16 tokens (one example per row, the loss on its answer). K reads key-value
statements only, S arithmetic only, J all of those plus the compositions over the train keys, for K's and S's
steps together. Each model's skill is measured at the end (K: recall of every binding; S: arithmetic on plain
numbers) and written to train_log.json.

The real-model case (copy_task.py): S is a pretrained model, so only K is trained, on S's tokenizer:

    python eval/composition/train_models.py K --skill-model models/smollm2-135m-hf --steps '{"K": 3000}' \
        --rows 64 --output eval/composition/runs/copy-smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import Task, batches, make_task, task_arguments  # noqa: E402
from score import exact_match  # noqa: E402

KINDS = {"K": "knowledge", "S": "skill", "J": "joint"}


def answer_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the labelled tokens, the head applied there only (a pretrained S's vocabulary
    makes the head over every position cost more than the rest of a small model)."""
    hidden = model.base_model(ids).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    taken = targets != -100
    return torch.nn.functional.cross_entropy(model.get_output_embeddings()(hidden[taken]), targets[taken])


def train_lm(model, data, steps: int, lr: float, warmup: int = 50, log=print) -> list[dict]:
    """AdamW (0.9, 0.95, weight decay 0.1 on matrices), linear warm-up, cosine to 10%, clip 1.0: the zoo's loop."""
    decay = [p for p in model.parameters() if p.dim() >= 2 and p.requires_grad]
    rest = [p for p in model.parameters() if p.dim() < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    model.train()
    curve, start = [], time.time()
    for step in range(steps):
        ids, labels = next(data)
        loss = answer_loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            curve.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - start, 1)})
            log(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)")
    return curve


def skills(model, tokenizer, task: Task, n: int = 500) -> dict:
    return {"recall": exact_match(model, tokenizer, task.eval_set("recall", len(task.keys)))["exact_match"],
            task.skill_name: exact_match(model, tokenizer, task.eval_set("skill", n))["exact_match"]}


def main():
    parser = task_arguments(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("names", nargs="+", choices=sorted(KINDS))
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "runs")
    parser.add_argument("--steps", type=json.loads, default={"K": 1500, "S": 1000},
                        help='steps per model as JSON, e.g. \'{"K": 1500, "S": 2000}\' (J: the sum)')
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--rows", type=int, default=Task.rows, help="rows per batch (each row one example)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    task = make_task(args)
    if args.skill_model and args.names != ["K"]:
        parser.error("with --skill-model, train K only: S is the pretrained model")
    tokenizer = task.tokenizer()
    for name in args.names:
        steps = args.steps.get(name, sum(args.steps.values()))
        torch.manual_seed(args.seed)
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
        if args.arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(hidden_size=args.width, intermediate_size=4 * args.width,
                                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                                 max_position_embeddings=task.seq_len, tie_word_embeddings=True, **ids))
        else:
            model = GPT2LMHeadModel(GPT2Config(n_positions=task.seq_len, n_embd=args.width, n_layer=4, n_head=4, **ids))
        start = time.time()
        curve = train_lm(model, batches(task, KINDS[name], tokenizer, args.seed, args.rows), steps, args.lr,
                         log=lambda line: print(f"{name} {line}", flush=True))
        seconds = time.time() - start
        measured = skills(model, tokenizer, task)
        out = args.output / name
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "train_log.json").write_text(json.dumps(
            {"kind": KINDS[name], "steps": steps, "tokens": steps * args.rows * task.seq_len, "seconds": round(seconds),
             "skills": measured, "curve": curve, "keys": args.keys, "values": args.values, "seed": args.seed}, indent=2))
        print(f"{name}: {measured} in {seconds:.0f}s -> {out}", flush=True)


if __name__ == "__main__":
    main()
