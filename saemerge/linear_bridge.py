"""The linear bridge (stitching): h_R += W h_A + b, one dense map per sender, receiver and site.

The baseline every sparse bridge has to beat: as many parameters as the residuals allow, no bottleneck, no
readable features. W and b start at zero (the bridge starts as no exchange) and are what calibration trains.
"""

from __future__ import annotations

from torch import nn

from .sae_bridge import SAEBridge, Step
from .wiring import receivers, senders_to


def pairs(config) -> list[tuple[str, str]]:
    """(sender, receiver) of every exchange the wiring makes."""
    return [(a, r) for r in receivers(config) for a in senders_to(config, r)]


def pair_key(sender: str, receiver: str) -> str:
    return f"{sender}_to_{receiver}"


class LinearBridge(SAEBridge):
    def __init__(self, config, saes=None):
        super().__init__(config, saes)
        d = {s["name"]: s["d_model"] for s in config.sources}
        self.stitches = nn.ModuleList([nn.ModuleDict({pair_key(a, r): nn.Linear(d[a], d[r]) for a, r in pairs(config)})
                                       for _ in range(config.n_sites)])
        for stitch in (s for site in self.stitches for s in site.values()):
            nn.init.zeros_(stitch.weight)
            nn.init.zeros_(stitch.bias)

    def modules(self):
        return {**super().modules(), "stitches": self.stitches}

    def calibration_parameters(self, saes: bool = False):
        return list(self.stitches.parameters())

    def send(self, site, residuals, step: Step | None = None):
        return residuals

    def receive(self, receiver, site, h, sent, residuals=None, step: Step | None = None):
        stitches = [(self.stitches[site][pair_key(a, receiver)], sent[a]) for a in senders_to(self.config, receiver)]
        return sum(stitch(x.to(stitch.weight)) for stitch, x in stitches).to(h)
