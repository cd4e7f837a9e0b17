"""Who sends features to whom, and which source runs a forward needs: read off the config alone.

heads: target  only `target` receives, from the sources in `inject`;
heads: mean / router  every source receives from all the others.
At a site every source's residual is read as it is there, after what it received at earlier sites.
"""

from __future__ import annotations

from .configuration import SAEMergedConfig


def receivers(config: SAEMergedConfig) -> list[str]:
    return [config.target] if config.heads == "target" else list(config.names)


def senders_to(config: SAEMergedConfig, receiver: str) -> list[str]:
    if config.heads == "target":
        return list(config.inject) if receiver == config.target else []
    return [n for n in config.names if n != receiver]


def senders(config: SAEMergedConfig) -> list[str]:
    """The sources whose codes cross at each site."""
    if config.scale == 0:
        return []
    return [n for n in config.names if n in config.inject] if config.heads == "target" else list(config.names)


def runs(config: SAEMergedConfig) -> list[str]:
    """The sources a forward runs side by side (lockstep.py), each once, each keeping its own KV cache: the
    receivers whole, the other senders up to their last site. A sender with a tokenizer of its own is not among
    them: it reads each prefix afresh in its own tokens (retokenize.py)."""
    running = set(receivers(config)) | set(senders(config)) - set(config.own_tokenizers)
    return [n for n in config.names if n in running]
