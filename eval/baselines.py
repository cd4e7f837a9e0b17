"""Baselines the SAE merge is measured against (benchmark code, not part of the saemerge package).

- the logit ensemble and the routed ensemble are SAEMergedForCausalLM with scale 0 (heads mean / router);
- the linear stitch: `merge.bridge: linear` (saemerge/linear_bridge.py), trained on next-token loss: the
  non-sparse bridge the SAE route has to beat;
- weight averaging: mergekit's `linear` method, run as its users run it.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import yaml


def mergekit_linear(models: list[Path], output: Path, weights: list[float] | None = None) -> Path:
    """Average the weights with mergekit's `linear` method through its own command line."""
    weights = weights or [1 / len(models)] * len(models)
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)]}
    output.mkdir(parents=True, exist_ok=True)
    (output.parent / f"{output.name}.mergekit.yml").write_text(yaml.safe_dump(config))
    cli = Path(sys.executable).with_name("mergekit-yaml")
    proc = subprocess.run([str(cli), str(output.parent / f"{output.name}.mergekit.yml"), str(output),
                           "--copy-tokenizer"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed: {proc.stderr.strip().splitlines()[-1:]}")
    return output


def domain_scores(results: dict, tasks: dict[str, str], counts: dict[str, tuple[int, int]]) -> dict:
    """lm-eval's bits per byte of each domain's task, also as nats per token (NLL = bpb * ln 2 * bytes, over the
    tokens of the one shared tokenizer), and the mixture as the mean of the domains. `tasks`: {domain: task};
    `counts`: {domain: (bytes, tokens)} of the scored text."""
    out = {}
    for domain, task in tasks.items():
        bpb = results[task]["bits_per_byte"]
        n_bytes, n_tokens = counts[domain]
        out[domain] = {"bpb": bpb, "loss": bpb * math.log(2) * n_bytes / n_tokens}
    out["mix"] = {k: sum(out[d][k] for d in tasks) / len(tasks) for k in ("bpb", "loss")}
    return out
