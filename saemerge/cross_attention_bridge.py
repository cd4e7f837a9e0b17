"""The cross-attention bridge (CALM's design, Bansal et al. 2024): the receiver's residual queries the sender's
residuals of the current and every earlier position.

  h_R[t] += W_o attention(q = W_q LN(h_R[t]), k = W_k LN(h_A[<=t]), v = W_v LN(h_A[<=t]))

with 4 heads in the receiver's width, per sender, receiver and site. W_o starts at zero (no exchange until
trained). Unlike the linear and SAE bridges, which read the sender at the same position only, it can fetch what
the sender knows at another token (a key's number, read where the answer is written). The mask is causal
(position t never sees a later token: the public CALM port passes no mask and, under teacher forcing, reads the
future); padding from the attention mask is masked too. With a KV cache the projected keys and values of past
tokens are kept in the bridge's own cache layers, one per sender, receiver and site.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear_bridge import pair_key, pairs
from .sae_bridge import SAEBridge, Step
from .wiring import senders_to

HEADS = 4


class CrossAttention(nn.Module):
    def __init__(self, d_query: int, d_memory: int, heads: int = HEADS):
        super().__init__()
        if d_query % heads:
            raise ValueError(f"cross_attention: the receiver's width {d_query} is not a multiple of {heads} heads")
        self.heads = heads
        self.norm_query, self.norm_memory = nn.LayerNorm(d_query), nn.LayerNorm(d_memory)
        self.query = nn.Linear(d_query, d_query, bias=False)
        self.key = nn.Linear(d_memory, d_query, bias=False)
        self.value = nn.Linear(d_memory, d_query, bias=False)
        self.out = nn.Linear(d_query, d_query)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, heads, T, d / heads]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def memory(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the sender's residuals h [B, T, d_memory]."""
        h = self.norm_memory(h.to(self.key.weight))
        return self.split(self.key(h)), self.split(self.value(h))

    def forward(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h: the receiver's residuals of the new positions [B, T, d]; keys/values: every position so far, the last
        T of them the new ones."""
        queries = self.split(self.query(self.norm_query(h.to(self.query.weight))))
        new, total = queries.shape[2], keys.shape[2]
        # Query i sits at position total - new + i and may see positions 0 .. total - new + i.
        allowed = torch.arange(total, device=h.device) <= torch.arange(total - new, total, device=h.device)[:, None]
        if attention_mask is not None:  # [B, total]: padding is never read
            allowed = allowed & attention_mask[:, None, None, -total:].to(device=h.device, dtype=torch.bool)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed)
        # A query whose every key is padding (left padding) gets NaN from the softmax: it receives nothing.
        out = torch.nan_to_num(out.transpose(1, 2).flatten(-2))
        return self.out(out)


class CrossAttentionBridge(SAEBridge):
    def __init__(self, config, saes=None):
        super().__init__(config, saes)
        d = {s["name"]: s["d_model"] for s in config.sources}
        self.pairs = pairs(config)
        self.attention = nn.ModuleList([nn.ModuleDict({pair_key(a, r): CrossAttention(d[r], d[a]) for a, r in self.pairs})
                                        for _ in range(config.n_sites)])

    def modules(self):
        return {**super().modules(), "attention": self.attention}

    def calibration_parameters(self, saes: bool = False):
        return list(self.attention.parameters())

    def cache_layers(self) -> int:
        return self.config.n_sites * len(self.pairs)

    def send(self, site, residuals, step: Step | None = None):
        """{(sender, receiver): (keys, values)} over every position so far (cached ones first)."""
        sent = {}
        for i, (a, r) in enumerate(self.pairs):
            if a not in residuals:  # scale 0: nothing is sent
                continue
            keys, values = self.attention[site][pair_key(a, r)].memory(residuals[a])
            if step is not None and step.memory:
                keys, values = step.memory[site * len(self.pairs) + i].update(keys, values)
            sent[a, r] = keys, values
        return sent

    def receive(self, receiver, site, h, sent, residuals=None, step: Step | None = None):
        mask = step.attention_mask if step is not None else None
        return sum(self.attention[site][pair_key(a, receiver)](h, *sent[a, receiver], mask)
                   for a in senders_to(self.config, receiver)).to(h)
