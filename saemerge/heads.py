"""The sources' output heads applied outside their forwards, a few positions at a time, and mixed.

With `heads: mean | router` the merged model returns log sum_s w_s softmax(logits_s). Each source's whole
[batch, tokens, vocabulary] logits, their log-softmaxes and the mixture held at once cost several times one
model's largest tensor (8.6 GB each for Gemma's 262k-token vocabulary at 16 x 512 tokens in float32). So each
source stops before its head (hooks.run_to_head), and the heads run here over `chunk_positions(...)` positions at
a time, mixed into one preallocated output; the loss, when labels are given, is taken chunk by chunk too.
"""

from __future__ import annotations

import torch
from torch import nn

# Elements of one [batch, positions, vocabulary] chunk: 256 MB of float32. Each chunk reads the head's whole weight
# again (671 MB for Gemma-3's), so a chunk must hold enough positions (256 for a 262k vocabulary) for the product
# to stay compute-bound: with 2^22 the mixture of a Gemma pair took 2.0x as long as with this, 2^24 1.2x.
CHUNK_ELEMENTS = 2**26


def chunk_positions(batch: int, vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, batch * vocab))


class OutputHead:
    """A source's logits from its last hidden state: its output embeddings, then what its family's forward does to
    them (Gemma's final soft-capping, Cohere's logit scale, Granite's logits scaling). `check` compares with the
    model's own logits once, so a family that does something else is refused instead of mixed wrongly."""

    def __init__(self, model: nn.Module):
        config = model.config.get_text_config(decoder=True)
        self.model = model
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.multiplier = getattr(model, "logit_scale", None) or getattr(config, "logit_scale", None)
        self.divisor = getattr(config, "logits_scaling", None)
        self.name = type(model).__name__
        self.checked = False

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.multiplier:
            logits = logits * self.multiplier
        if self.divisor:
            logits = logits / self.divisor
        return logits

    def check(self, hidden: torch.Tensor, own_logits: torch.Tensor) -> None:
        ours = self(hidden).float()
        tolerance = 1e-3 if ours.dtype == own_logits.dtype == torch.float32 else 5e-2
        if not torch.allclose(ours, own_logits.float(), rtol=tolerance, atol=tolerance * ours.abs().max().item()):
            raise ValueError(f"{self.name}: its forward transforms the output head's logits in a way saemerge does "
                             "not know; heads 'mean' and 'router' cannot mix its logits (heads 'target' can)")
        self.checked = True


def mix_heads(log_weights: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
    """log sum_s w_s softmax(logits_s): the log of the mixed next-token distribution, in float32 whatever the
    sources' dtype (a 16-bit log-softmax loses the small probabilities the mixture adds up), on log_weights'
    device. Summed as probabilities, then one log (1.2x as fast on the quickstart as a log-softmax per source
    and pairwise logaddexp): exact while every token's mixed probability stays a normal float32 (a
    log-probability above -87); the rows where one falls below are taken again in log space. Without autograd
    (inference) it works in place."""
    in_place, device = not torch.is_grad_enabled(), log_weights.device
    log_weights = log_weights.float()
    probs = None
    for i, x in enumerate(logits):
        p = x.to(device, torch.float32).softmax(-1)  # sources may sit on other devices
        p = p.mul_(log_weights[..., i, None].exp()) if in_place else p * log_weights[..., i, None].exp()
        probs = p if probs is None else probs.add_(p) if in_place else probs + p
    tiny = torch.finfo(torch.float32).tiny
    underflow = probs.amin(-1) < tiny
    if not underflow.any():
        return probs.log_() if in_place else probs.log()
    # Clamped, the log (and its gradient) stays finite; the rows that underflowed are then replaced.
    mixed = probs.clamp_min_(tiny).log_() if in_place else probs.clamp_min(tiny).log()
    w = log_weights[underflow]
    rows = [x[underflow.to(x.device)].to(device, torch.float32).log_softmax(-1) + w[:, i, None]
            for i, x in enumerate(logits)]
    mixed[underflow] = torch.stack(rows).logsumexp(0)
    return mixed


def mixed_log_probs(log_weights: torch.Tensor, hidden: list[torch.Tensor], heads: list[OutputHead]) -> torch.Tensor:
    """mix_heads over the sources' last hidden states [batch, positions, d_s], a chunk of positions at a time,
    into one float32 [batch, positions, vocabulary] tensor: the only vocabulary-sized tensor held whole."""
    (batch, positions), vocab = hidden[0].shape[:2], heads[0].vocab_size
    step = chunk_positions(batch, vocab)
    if step >= positions:
        return mix_heads(log_weights, [head(h) for head, h in zip(heads, hidden)])
    out = torch.empty(batch, positions, vocab, dtype=torch.float32, device=log_weights.device)
    for start in range(0, positions, step):
        part = slice(start, start + step)
        out[:, part] = mix_heads(log_weights[:, part], [head(h[:, part]) for head, h in zip(heads, hidden)])
    return out


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Mean cross-entropy of each position's logits against the next position's label (-100: none), in float32
    a chunk of positions at a time (a float32 copy of all logits at once would double a large vocabulary's);
    `normalized`: the logits are log-probabilities already (the mixture), so no log-softmax is taken again."""
    targets = nn.functional.pad(labels[:, 1:], (0, 1), value=-100).to(logits.device)
    loss = nn.functional.nll_loss if normalized else nn.functional.cross_entropy
    step, total = chunk_positions(logits.shape[0], logits.shape[-1]), 0
    for start in range(0, logits.shape[1], step):
        part = logits[:, start:start + step].flatten(0, 1).float()
        total = total + loss(part, targets[:, start:start + step].flatten(), ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum()
