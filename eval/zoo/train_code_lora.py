#!/usr/bin/env python3
"""A code specialist: a LoRA fine-tune of Gemma-3-270m on the code corpus's train split, with peft.

    python eval/zoo/prepare_pretrained.py --only gemma-3-270m    # once
    python eval/zoo/train_code_lora.py                           # ~20 minutes on 2 CPU cores

Writes eval/zoo/gemma3-code-lora/ (adapter_config.json + adapter_model.safetensors, and train_log.json with
the validation loss of the base and of the adapter on both domains). The base is the dequantized GGUF
(models/gemma-3-270m-hf); the adapter applies equally on top of the .gguf itself. Only the train split is
read for training and the validation split for the log: the test split is the benchmark's.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ZOO = Path(__file__).resolve().parent
sys.path.insert(0, str(ZOO))
from train_zoo import sample_batch, token_stream  # noqa: E402

BASE = ZOO.parents[1] / "models" / "gemma-3-270m-hf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def windows(streams, mix, batch, seq_len, generator, bos) -> torch.Tensor:
    """Random windows of seq_len - 1 tokens, each after BOS: Gemma expects BOS first, and so do the
    saemerge data pipeline and lm-eval (without it the adapter mostly learns to do without BOS)."""
    x = sample_batch(streams, mix, batch, seq_len - 1, generator)
    return torch.cat([torch.full((len(x), 1), bos), x], dim=1)


@torch.no_grad()
def validation_loss(model, streams, seq_len, bos, batches=4) -> dict:
    generator = torch.Generator().manual_seed(0)  # the same windows for the base and the adapter
    model.eval()
    out = {c: sum(model(x := windows({c: s}, {c: 1.0}, 4, seq_len, generator, bos), labels=x).loss.item()
                  for _ in range(batches)) / batches for c, s in streams.items()}
    model.train()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=BASE)
    parser.add_argument("--out", type=Path, default=ZOO / "gemma3-code-lora")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, use_safetensors=True)
    train = {"code": token_stream("code", "train", tokenizer)}
    valid = {c: token_stream(c, "validation", tokenizer) for c in ("prose", "code")}
    before = validation_loss(model, valid, args.seq_len, tokenizer.bos_token_id)
    print(f"base validation loss {before}", flush=True)

    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - 0.9 * s / args.steps))
    generator = torch.Generator().manual_seed(args.seed)
    log, start = [], time.time()
    for step in range(args.steps):
        x = windows(train, {"code": 1.0}, args.batch, args.seq_len, generator, tokenizer.bos_token_id)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": loss.item(), "seconds": round(time.time() - start, 1)})
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    after = validation_loss(model, valid, args.seq_len, tokenizer.bos_token_id)
    print(f"adapter validation loss {after}", flush=True)
    model.save_pretrained(args.out)
    (args.out / "train_log.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "log": log, "tokens": args.steps * args.batch * args.seq_len,
         "validation_loss": {"base": before, "adapter": after}}, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
