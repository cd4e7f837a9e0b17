"""An on-disk cache of harvested activations (`data.cache`), so that runs that differ only in the latent or the
training settings skip the sources' forwards.

One safetensors file per token batch, `batch-<i>.safetensors` with tensors `<site>.<source>`, in a folder named
by a hash of everything that decides the activations: each source (model, revision, GGUF file, adapter, dtype,
layers, and for local files their sizes and modification times), the data mixture and sequence length, the
sequences per batch, the seed and this process's share. The token budget is not part of it: a longer run reuses
the batches a shorter one left and adds its own. Files are written whole and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .recipe import Recipe

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".json")


def _fingerprint(path: str | None) -> list | None:
    """Sizes and modification times of a local model's files (None for a hub id): a retrained folder misses."""
    if not path or not Path(path).exists():
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.suffix in WEIGHT_SUFFIXES)
    return [[str(f.relative_to(root.parent)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def cache_key(recipe: Recipe, paths: dict[str, list[str]], batch_size: int, rank: int, world: int) -> dict:
    sources = []
    for spec in recipe.models:
        gguf = str(Path(spec.model) / spec.gguf_file) if spec.gguf_file else None
        sources.append({"model": spec.model, "revision": spec.revision, "gguf_file": spec.gguf_file,
                        "adapter": spec.adapter, "dtype": spec.dtype, "layers": paths[spec.name],
                        "files": [_fingerprint(gguf or spec.model), _fingerprint(spec.adapter)]})
    data = recipe.data.model_dump(mode="json", exclude={"tokens", "cache"})
    return {"version": 1, "sources": sources, "data": data, "batch_size": batch_size, "seed": recipe.train.seed,
            "rank": rank, "world": world}


class ActivationCache:
    def __init__(self, root: str | Path, key: dict):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / digest
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "key.json").is_file():
            (self.folder / "key.json").write_text(json.dumps(key, indent=2))

    def _file(self, index: int) -> Path:
        return self.folder / f"batch-{index:07d}.safetensors"

    def load(self, index: int) -> list[dict[str, torch.Tensor]] | None:
        """Batch `index` (per site, {source: [tokens, d]}), or None if it is not cached."""
        if not self._file(index).is_file():
            return None
        tensors = load_file(self._file(index))
        sites = [{} for _ in range(1 + max(int(k.split(".", 1)[0]) for k in tensors))]
        for key, x in tensors.items():
            site, name = key.split(".", 1)
            sites[int(site)][name] = x
        return sites

    def save(self, index: int, sites: list[dict[str, torch.Tensor]]) -> None:
        path = self._file(index)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({f"{s}.{name}": x.contiguous().cpu() for s, site in enumerate(sites) for name, x in site.items()}, tmp)
        os.replace(tmp, path)
