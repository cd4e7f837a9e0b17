"""Baselines the SAE merge is measured against (benchmark code, not part of the saemerge package).

- the logit ensemble and the routed ensemble are SAEMergedForCausalLM with scale 0 (heads mean / router);
- the linear stitch: a dense map from one source's residual into the other's at the same layer, trained on
  next-token loss: the non-sparse bridge the SAE route has to beat;
- weight averaging: mergekit's `linear` method, run as its users run it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from torch import nn

from saemerge import SAEMergedForCausalLM
from saemerge.modeling import BRIDGES
from saemerge.sae_bridge import SAEBridge
from saemerge.wiring import senders_to


class LinearBridge(SAEBridge):
    """h_T += W h_A + b at the target's layers (W, b start at zero): the SAE bridge's feature path replaced by one
    dense linear map per sender and site (its SAEs stay: they are trained anyway and the router reads their
    scales). A bridge of its own, plugged in through saemerge.modeling.BRIDGES."""

    def __init__(self, config, saes=None):
        super().__init__(config, saes)
        d = {s["name"]: s["d_model"] for s in config.sources}
        self.stitches = nn.ModuleList([nn.ModuleDict({a: nn.Linear(d[a], d[config.target]) for a in config.inject})
                                       for _ in range(config.n_sites)])
        for stitch in (s for site in self.stitches for s in site.values()):
            nn.init.zeros_(stitch.weight)
            nn.init.zeros_(stitch.bias)

    def modules(self):
        return {**super().modules(), "stitches": self.stitches}

    def calibration_parameters(self):
        return list(self.stitches.parameters())

    def send(self, site, residuals):
        return residuals

    def receive(self, receiver, site, h, sent, residuals=None):
        return sum(self.stitches[site][a](sent[a].float()) for a in senders_to(self.config, receiver)).to(h.dtype)


BRIDGES["linear"] = LinearBridge


class StitchedForCausalLM(SAEMergedForCausalLM):
    """SAEMergedForCausalLM with the linear bridge, whatever its config says."""

    def __init__(self, config, sources=None, saes=None):
        config.bridge = "linear"
        super().__init__(config, sources, saes)


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
