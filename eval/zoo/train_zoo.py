#!/usr/bin/env python3
"""Train the zoo: small GPT-2s from scratch on the local corpora, reproducibly from a seed.

    python eval/zoo/train_zoo.py prose code joint      # ~10 minutes each on 2 CPU cores
    python eval/zoo/train_zoo.py prose --seed 1 --save-as prose-seed1      # the universality experiments' pairs
    python eval/zoo/train_zoo.py prose --width 128 --save-as prose-w128

prose trains on prose only, code on code only, joint on the 50/50 mixture (a reference), all with the same
size, seed and token budget. Each is saved to eval/zoo/<name>/ (float16 safetensors, the shared tokenizer and
train_log.json). The setting follows ../shared/PILOT.md: 4 blocks, width 256, 4 heads, context 128, AdamW
lr 1.5e-3 (0.9, 0.95), weight decay 0.1, 50 warm-up steps, cosine to 10%, clip 1.0, batch 16 x 128, 850 steps.
"""

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

ZOO = Path(__file__).resolve().parent
DATA = ZOO.parent / "data"
MIXES = {"prose": {"prose": 1.0}, "code": {"code": 1.0}, "joint": {"prose": 0.5, "code": 0.5}}


def token_stream(corpus: str, split: str, tokenizer) -> torch.Tensor:
    """Every document of a split, tokenized and joined with EOS, as one long tensor."""
    ids = []
    with gzip.open(DATA / corpus / f"{split}.jsonl.gz", "rt") as f:
        for line in f:
            ids.extend(tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id])
    return torch.tensor(ids)


def sample_batch(streams: dict, mix: dict, batch: int, seq_len: int, generator) -> torch.Tensor:
    rows = []
    for corpus, share in mix.items():
        stream = streams[corpus]
        starts = torch.randint(0, len(stream) - seq_len, (round(batch * share),), generator=generator)
        rows += [stream[s:s + seq_len] for s in starts.tolist()]
    return torch.stack(rows)


@torch.no_grad()
def held_out_loss(model, streams, seq_len, generator, batches=8) -> dict:
    model.eval()
    out = {corpus: sum(model(x := sample_batch({corpus: s}, {corpus: 1.0}, 16, seq_len, generator), labels=x).loss.item()
                       for _ in range(batches)) / batches for corpus, s in streams.items()}
    model.train()
    return out


def train(name: str, args) -> None:
    tokenizer = AutoTokenizer.from_pretrained(ZOO / "tokenizer")
    streams = {c: token_stream(c, "train", tokenizer) for c in MIXES[name]}
    valid = {c: token_stream(c, "validation", tokenizer) for c in ("prose", "code")}
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.seq_len, n_embd=args.width, n_layer=4, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 50 if s < 50 else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * (s - 50) / (args.steps - 50))))
    generator = torch.Generator().manual_seed(args.seed)
    log, start = [], time.time()
    for step in range(args.steps):
        x = sample_batch(streams, MIXES[name], args.batch, args.seq_len, generator)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": loss.item(), "seconds": round(time.time() - start, 1)})
            print(f"{name} step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    validation = held_out_loss(model, valid, args.seq_len, torch.Generator().manual_seed(0))
    out = ZOO / (args.save_as or name)
    model.to(torch.float16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps({"args": vars(args), "mix": MIXES[name], "log": log,
                                                    "validation_loss": validation,
                                                    "tokens": args.steps * args.batch * args.seq_len}, indent=2))
    print(f"{name}: validation loss {validation} -> {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=sorted(MIXES))
    parser.add_argument("--steps", type=int, default=850)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    parser.add_argument("--width", type=int, default=256, help="residual width (n_embd; 4 heads)")
    parser.add_argument("--save-as", help="folder name under eval/zoo/ (default: the mixture's name; one name only)")
    args = parser.parse_args()
    if args.save_as and len(args.names) > 1:
        parser.error("--save-as takes one name")
    for name in args.names:
        train(name, args)


if __name__ == "__main__":
    main()
