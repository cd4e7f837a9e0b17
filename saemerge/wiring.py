"""Who sends features to whom, and which source runs a forward needs: read off the config alone.

heads: target  only `target` receives, from the sources in `inject`;
heads: mean / router  every source receives from all the others.
"""

from __future__ import annotations

from .configuration import SAEMergedConfig


def receivers(config: SAEMergedConfig) -> list[str]:
    return [config.target] if config.heads == "target" else list(config.names)


def senders_to(config: SAEMergedConfig, receiver: str) -> list[str]:
    if config.heads == "target":
        return list(config.inject) if receiver == config.target else []
    return [n for n in config.names if n != receiver]


def send_runs(config: SAEMergedConfig) -> list[str]:
    """The sources that run up to their last layer before any receiver runs, so that what they send exists.
    Receivers that also send run twice up to it (simple, not free). A receiver that sends nothing runs there too
    only when its own un-injected codes are needed at a later site (combine: mean, several sites): at the first
    site its stream is the one its receiving run injects into."""
    if config.scale == 0:
        return []
    if config.heads != "target" or (config.combine == "mean" and config.n_sites > 1):
        return list(config.names)
    return [n for n in config.names if n in senders_to(config, config.target)]


def runs(config: SAEMergedConfig) -> list[tuple[str, str]]:
    """(role, source) of every source run of one forward that keeps a KV cache: the send runs, then the receiving
    runs. A sender with a tokenizer of its own keeps none: it reads each prefix afresh (retokenize.py)."""
    return [("send", n) for n in send_runs(config) if n not in config.own_tokenizers] + \
        [("receive", n) for n in receivers(config)]
