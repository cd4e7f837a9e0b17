"""Run a model with its dictionaries in place, to edit features and to take gradients with respect to them.

At every site the activation x is encoded, z = Enc(x), and an edit of the code becomes x + Dec(z') - Dec(z): the
site keeps the SAE's error on what it actually receives (x - Dec(z)), so an unedited run is the model's own run
exactly, and an edit changes the chosen features and nothing else. Position 0 (an attention sink, left out of
training) is never edited.

With `grad=True` a zero tensor (a leaf) is added to each site's output; its .grad after a backward is the total
derivative of the metric with respect to that site's output, through every later layer and site. The derivative
with respect to a feature follows with the error held fixed (as in Marks et al., sparse feature circuits, 2024):
dm/dz_i = act_scale * <dm/dx, W_dec[i]> (`code_gradient`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .dictionaries import Dictionaries
from .hooks import StopForward

# (site index, codes [batch, seq, d_sae]) -> the codes to use instead; codes of other sites are not passed.
Edit = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class FeatureRun:
    output: Any  # the model's output; None when stopped after the site `until`
    codes: list[torch.Tensor | None]  # per site, the codes of what the site received (before its edit)
    deltas: list[torch.Tensor | None] = field(default_factory=list)  # grad=True: the zero leaves at each site


def run_features(model, dicts: Dictionaries, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 edit: Edit | None = None, until: int | str | None = None, grad: bool = False,
                 sites: list[int] | None = None, **forward_kwargs) -> FeatureRun:
    """One forward pass of `model` with `dicts`' SAEs at their sites (`sites`: only these; default all).
    `edit` changes codes; `until` stops the pass once that site has run (no later blocks, no head), or with
    "all" once every hooked site has."""
    sites = list(range(len(dicts.paths))) if sites is None else sites
    run = FeatureRun(None, [None] * len(dicts.paths), [None] * len(dicts.paths))

    def hook(site: int):
        sae = dicts.saes[site]

        def fn(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            with torch.set_grad_enabled(grad):
                z = sae.encode(x)
                run.codes[site] = z
                new = x
                if edit is not None:
                    edited = edit(site, z)
                    edited = torch.cat([z[:, :1], edited[:, 1:]], 1)  # position 0 stays as it is
                    new = x + sae.decode(edited - z, bias=False).to(x.dtype)
                if grad:
                    run.deltas[site] = torch.zeros_like(new, requires_grad=True)
                    new = new + run.deltas[site]
            if until == site or (until == "all" and all(run.codes[s] is not None for s in sites)):
                raise StopForward
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return fn

    handles = [model.get_submodule(dicts.paths[s]).register_forward_hook(hook(s)) for s in sites]
    try:
        with torch.set_grad_enabled(grad):
            run.output = model(input_ids=input_ids, attention_mask=attention_mask,
                               **{"use_cache": False, **forward_kwargs})
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return run


def code_gradient(dicts: Dictionaries, site: int, output_grad: torch.Tensor) -> torch.Tensor:
    """dm/dz at `site` [batch, seq, d_sae] from dm/dx at its output (a delta's .grad), the error held fixed."""
    sae = dicts.saes[site]
    return (output_grad.float() @ sae.W_dec.detach().T) * float(sae.act_scale)


@torch.no_grad()
def mean_codes(model, dicts: Dictionaries, batches, sites: list[int] | None = None) -> list[torch.Tensor | None]:
    """Each site's mean code [d_sae] over the real tokens (attention mask, position 0 left out) of `batches`
    (an iterable of (input_ids, attention_mask)): what mean ablation puts in a feature's place."""
    sums, count = [None] * len(dicts.paths), 0
    for ids, mask in batches:
        run = run_features(model, dicts, ids, mask, sites=sites, until="all")
        keep = mask.clone() if mask is not None else torch.ones_like(ids)
        keep[:, 0] = 0
        keep = keep.bool()
        for s, z in enumerate(run.codes):
            if z is not None:
                total = z[keep].sum(0)
                sums[s] = total if sums[s] is None else sums[s] + total
        count += int(keep.sum())
    return [None if total is None else total / max(count, 1) for total in sums]
