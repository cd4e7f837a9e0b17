"""Baselines the SAE merge is measured against (benchmark code, not part of the saemerge package).

- the logit ensemble and the routed ensemble are SAEMergedForCausalLM with scale 0 (heads mean / router);
- the linear stitch: `merge.bridge: linear` (saemerge/linear_bridge.py), trained on next-token loss: the
  non-sparse bridge the SAE route has to beat;
- weight averaging: mergekit's `linear` method, run as its users run it.
"""

from __future__ import annotations

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
