#!/usr/bin/env python3
"""Train one bridge on the compositions and print, every `--every` steps, how many answers it gets right on the
valid keys under teacher forcing (each answer token, and whole answers): where a bridge stalls, and on which
digit. The benchmark's settings and options (sites, steps, learning rate, `--values`, `--runs`) apply.

    python eval/composition/learning_curve.py --bridge cross_attention --k-layers 1 2 3 --s-layers 0 1 2
    python eval/composition/learning_curve.py --values 10 --runs eval/composition/runs/one-digit  # one-digit numbers

`--receiver` trains S's weights too (all but its embeddings, `merge.calibrate.receiver`; at `--receiver-lr`): S
learns to read what is sent.
"""

from __future__ import annotations

import json
import time

import torch
from benchmark import Benchmark, arguments
from data import batches, row

from saemerge.calibrate import train_on_next_token_loss


@torch.no_grad()
def answer_accuracy(model, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """Teacher-forced (and in eval mode, as training leaves the sources: no dropout) accuracy of the answer's first, second and third tokens (the third: ' .' or a digit after a
    sign) and of whole answers."""
    model.eval()
    predicted, labels = model(ids).logits[:, :-1].argmax(-1), labels[:, 1:]
    answer = labels != -100
    index = answer.long().cumsum(1) - 1
    scores = {f"token {i}": (((predicted == labels) & answer & (index == i)).sum() / (answer & (index == i)).sum()).item()
              for i in range(3)}
    scores["whole"] = ((predicted == labels) | ~answer).all(1).float().mean().item()
    return {k: round(v, 3) for k, v in scores.items()}


def main():
    parser = arguments(__doc__)
    parser.add_argument("--bridge", default="cross_attention", choices=["sae", "linear", "cross_attention"])
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--receiver", action="store_true")
    parser.set_defaults(choose=True, quiet=True)
    args = parser.parse_args()
    if args.bridge != "sae":  # the other bridges carry nothing through the SAEs
        args.sae_steps = 1
    torch.manual_seed(args.seed)
    bench = Benchmark(args)
    model = bench.merged(bridge=args.bridge, gates=("latent", "token") if args.bridge == "sae" else ())
    params = model.calibration_parameters(receiver=args.receiver)
    rows = [row(e, bench.tokenizer, bench.task.seq_len) for e in bench.task.eval_set("valid", args.eval_examples)]
    ids, labels = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    data, start = batches(bench.task, "composition", bench.tokenizer, args.seed + 1), time.time()
    for done in range(args.every, args.steps + 1, args.every):
        lr = args.receiver_lr if args.receiver else args.lr
        loss = train_on_next_token_loss(model, params, data, args.every, lr, progress=False)["loss_last"]
        print(json.dumps({"step": done, "loss": round(loss, 3), **answer_accuracy(model, ids, labels),
                          "seconds": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main()
