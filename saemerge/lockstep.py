"""Sources run side by side, each paused at its sites until every one has reached them.

What a receiver gets at a site depends on what the others hold there, so no source may pass a site before all
have reached it. Each source's forward runs as a greenlet: a coroutine that can pause deep inside the model's own
forward, in the same thread (grad mode, autocast and the device's stream carry over). A hook on each site's
module hands its output to the caller and waits for what to add to it. So every block of every source runs once
per forward, with or without a KV cache, whatever the model family.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import greenlet
import torch
from torch import nn

from .hooks import StopForward

_STOP = object()  # the answer that ends a run at its last site


@dataclass
class Run:
    forward: Callable[[], Any]  # one source's forward (or the part of it that is needed)
    sites: list[nn.Module]  # the modules whose outputs are its sites, in the order the model runs them
    whole: bool = True  # go on after the last site; False stops there (a source that only sends)


def _pause(worker: greenlet.greenlet, site: int, module, args, output):
    if greenlet.getcurrent() is not worker:
        return None  # the same module run by another forward: not this one's site
    hidden = output[0] if isinstance(output, tuple) else output
    added = worker.parent.switch((site, hidden))
    if added is _STOP:
        raise StopForward
    if added is None:
        return None
    new = hidden + added.to(hidden.dtype)
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _body(run: Run, *_):
    try:
        return run.forward()
    except StopForward:
        return None


def in_lockstep(runs: dict[str, Run], exchange: Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
                ) -> dict[str, Any]:
    """Runs every forward up to its first site, calls `exchange(site, {name: its output there})`, which returns
    {name: what to add to that output} (a name left out gets nothing), lets each go on to its next site, and so on;
    returns what each forward returned (None for a run that stops at its last site)."""
    (n_sites,) = {len(run.sites) for run in runs.values()}
    workers = {name: greenlet.greenlet(partial(_body, run)) for name, run in runs.items()}
    handles = [module.register_forward_hook(partial(_pause, workers[name], site))
               for name, run in runs.items() for site, module in enumerate(run.sites)]
    try:
        answers = dict.fromkeys(runs)
        for site in range(n_sites):
            at_site = {}
            for name, worker in workers.items():
                paused = worker.switch(answers[name])
                if worker.dead or paused[0] != site:
                    raise RuntimeError(f"source '{name}' did not reach its site {site} next: its layers must be "
                                       "modules that run once per forward, in the order the model runs them")
                at_site[name] = paused[1]
            added = exchange(site, at_site)
            answers = {name: added.get(name) for name in runs}
        outputs = {}
        for name, worker in workers.items():
            outputs[name] = worker.switch(answers[name] if runs[name].whole else _STOP)
            if not worker.dead:
                raise RuntimeError(f"source '{name}' passed a site twice in one forward")
        return outputs
    finally:
        for handle in handles:
            handle.remove()
        for worker in workers.values():
            if not worker.dead:
                worker.throw()  # GreenletExit unwinds its forward
