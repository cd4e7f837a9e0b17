"""The merged model's KV cache, on transformers' public Cache API."""

from __future__ import annotations

import inspect

from torch import nn
from transformers import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (in forwards and in outputs, the old name
# deprecated); read the name off the installed release rather than off its version number.
OUTPUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(model: nn.Module) -> str:
    """The name under which `model.forward` takes its KV cache (`cache`, or `past_key_values` before 5.24 and in
    remote code written for it)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class MergedCache(Cache):
    """The merged model's KV cache: one DynamicCache per source, keyed "source:NAME" (each runs once per forward,
    lockstep.py; a source that only sends fills its layers up to its last site). A bridge that attends over past
    positions keeps its own layers under "bridge". To `generate` it is one transformers `Cache` whose layers are
    all of theirs, so what generate does to a cache (reorder for beam search, select, crop, ...) is the Cache
    API's own code reaching every source."""

    def __init__(self, caches: dict[str, Cache]):
        self.caches = caches
        # DynamicCache(config=...) makes its layers up front, so this list is complete from the start.
        super().__init__(layers=[layer for cache in caches.values() for layer in cache.layers])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Every source sees the same tokens; a sender's cache is filled only up to its layer, so take the longest.
        return max(cache.get_seq_length(layer_idx) for cache in self.caches.values())

    @property
    def is_compileable(self) -> bool:
        return False  # several caches under hooks: generate must not compile the forward


def given_cache(cache, other_kwargs: dict) -> MergedCache | None:
    """The cache a forward was given, checked: a MergedCache or None, and no Cache under any other name (running
    without a cache that arrived under a new name gives other tokens, silently: refuse instead)."""
    if unknown := [k for k, v in other_kwargs.items() if isinstance(v, Cache)]:
        raise TypeError(f"the merged model's forward got a KV cache as {unknown}; it takes it as `cache` (or "
                        "`past_key_values`)")
    if cache is not None and not isinstance(cache, MergedCache):
        raise TypeError(f"the KV cache of a merged model is a MergedCache (model.new_cache()), not a {type(cache).__name__}")
    return cache
