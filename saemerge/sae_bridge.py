"""The SAE bridge: features carried between residual streams through the shared latent space.

A receiver R gets, at each of its sites, the codes of the sources A that send to it (z_A = Enc_A(h_A)):
  sum:  h_R += scale * t * Dec_R(g * sum_A z_A)                     (no decoder bias: h_R already has the mean)
  mean: h_R += scale * t * Dec_R(g * sum_A (z_A - z_R) / (n + 1))
        = the mean of R's own reconstruction and those decoded from the other codes, keeping R's
          reconstruction error h_R - Dec_R(z_R).
g is a per-latent gate and t a per-token gate (both 1 until calibrated; see calibrate.py); `scale` is applied
by the model.

A bridge is what the merged model asks two things of: `send(site, residuals, step)` turns the senders' residuals
at a site into what crosses (once per forward), and `receive(receiver, site, h, sent, residuals, step)` returns
what is added to the receiver's residual h there; `step` (a Step) holds the forward's attention mask and the
bridge's own KV cache layers, if it asked for any (`cache_layers()`). Its `modules()` are registered on the model
under their own names, so they are saved, loaded, moved and device-mapped with it; `calibration_parameters()` are
what calibration trains. The other bridges (linear_bridge.py, cross_attention_bridge.py) build on this one: they
keep its SAEs, which the router reads and the analysis uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .configuration import SAEMergedConfig
from .sae import SAEConfig, SparseAutoencoder
from .wiring import receivers, senders_to


def scaled_residuals(saes: nn.ModuleDict, names: list[str], residuals: dict[str, torch.Tensor],
                     reader: nn.Linear) -> torch.Tensor:
    """Every source's residual at one site divided by its SAE's scale, side by side, on the device and in the
    dtype of the gate or router that reads them (a device map may put sources elsewhere)."""
    return torch.cat([(residuals[n].to(saes[n].act_scale) / saes[n].act_scale).to(reader.weight) for n in names],
                     dim=-1)


@dataclass
class Step:
    """What a bridge may need of the forward beyond the residuals."""
    attention_mask: torch.Tensor | None = None  # [batch, all positions so far], 1 = a real token
    memory: list = field(default_factory=list)  # the bridge's KV cache layers (empty without a cache)


class SAEBridge:
    def __init__(self, config: SAEMergedConfig, saes: list[dict[str, SparseAutoencoder]] | None = None):
        self.config = config
        if saes is None:
            saes = [{s["name"]: SparseAutoencoder(SAEConfig(d_in=s["d_model"], **config.latent)) for s in config.sources}
                    for _ in range(config.n_sites)]
        self.saes = nn.ModuleList([nn.ModuleDict(site) for site in saes])  # saes[site][source]
        d_all = sum(s["d_model"] for s in config.sources)
        # Gates start as the identity: 2 * sigmoid(0) = 1.
        sites, gated = range(config.n_sites), receivers(config)
        self.latent_gates = nn.ModuleList([nn.ParameterDict(
            {r: nn.Parameter(torch.zeros(config.latent["d_sae"])) for r in gated if "latent" in config.gates})
            for _ in sites])
        self.token_gates = nn.ModuleList([nn.ModuleDict(
            {r: nn.Linear(d_all, 1) for r in gated if "token" in config.gates}) for _ in sites])
        for gate in (g for site in self.token_gates for g in site.values()):
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
        # With `record` set (SAE fine-tuning, calibrate.py), the residuals each site saw: seen[site][source].
        self.record, self.seen = False, [{} for _ in sites]

    def modules(self) -> dict[str, nn.Module]:
        return {"saes": self.saes, "latent_gates": self.latent_gates, "token_gates": self.token_gates}

    def calibration_parameters(self, saes: bool = False) -> list[nn.Parameter]:
        """The gates; with `saes`, the SAEs too (trained end to end, see calibrate.py)."""
        return [*self.latent_gates.parameters(), *self.token_gates.parameters(), *(self.saes.parameters() if saes else [])]

    def cache_layers(self) -> int:
        return 0  # codes are recomputed from each new token's residual: nothing to keep

    def send(self, site: int, residuals: dict[str, torch.Tensor], step: Step | None = None) -> dict[str, torch.Tensor]:
        """The codes of every source that ran up to this site."""
        if self.record:
            self.seen[site].update(residuals)
        return {n: self.saes[site][n].encode(h) for n, h in residuals.items()}

    def receive(self, receiver: str, site: int, h: torch.Tensor, sent: dict[str, torch.Tensor],
                residuals: dict[str, torch.Tensor] | None = None, step: Step | None = None) -> torch.Tensor:
        """What the senders' codes `sent` add to `receiver`'s residual h at one site (before `scale`)."""
        if self.record:
            self.seen[site][receiver] = h
        sae = self.saes[site][receiver]
        senders = senders_to(self.config, receiver)
        # Codes go to the receiver's SAE and the result back to h (a device map may spread them over devices).
        codes = [sent[a].to(sae.W_dec) for a in senders]
        if self.config.combine == "sum":
            code = sum(codes)
        else:
            # Biases cancel in the difference of two reconstructions, so decode the code difference alone.
            own = sent[receiver].to(sae.W_dec) if receiver in sent else sae.encode(h)
            code = sum(z - own for z in codes) / (len(senders) + 1)
        if receiver in self.latent_gates[site]:
            code = code * 2 * torch.sigmoid(self.latent_gates[site][receiver]).to(code)
        delta = sae.decode(code, bias=False)
        if receiver in self.token_gates[site]:
            gate = self.token_gates[site][receiver]
            inputs = scaled_residuals(self.saes[site], self.config.names, {**(residuals or {}), receiver: h}, gate)
            delta = delta * 2 * torch.sigmoid(gate(inputs)).to(delta)
        return delta.to(h)
