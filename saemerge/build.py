"""Assemble the merged model in memory from loaded sources and trained SAEs."""

from __future__ import annotations

from transformers import PreTrainedModel

from .modeling import SAEMergedConfig, SAEMergedForCausalLM
from .recipe import MergeSpec, Recipe
from .sae import SparseAutoencoder
from .retokenize import same_tokenizer
from .sources import load_tokenizer, reference


def merged_model(sources: dict[str, PreTrainedModel], saes: list[dict[str, SparseAutoencoder]],
                 layers: dict[str, list[str]], merge: MergeSpec, references: dict[str, dict] | None = None,
                 storage: str = "self-contained", tokenizers: dict | None = None) -> SAEMergedForCausalLM:
    """The merged model of `sources` ({name: causal LM}) and `saes` (saes[site][name], as train_saes returns them)
    at `layers` ({name: one module path per site}), wired as `merge` says (target, heads, combine, scale, inject,
    gates, bridge). Sources and SAEs are used as they are (not copied); the result is in eval mode. `references`
    ({name: load_pretrained_source arguments}, default: each source's name_or_path and dtype) say where the sources
    come from again, as `storage: reference` saves them and the model card names them. `tokenizers` ({name:
    tokenizer}) are needed when they differ: a source whose tokenizer is not the target's reads the target's text
    in its own (retokenize.py), and the model saves them all."""
    references = {n: {"model": m.name_or_path, "dtype": str(m.dtype).removeprefix("torch.")}
                  for n, m in sources.items()} | (references or {})
    latent = saes[0][next(iter(sources))].cfg
    tokenizers = tokenizers or {}
    target = tokenizers.get(merge.target)
    own = {n for n, t in tokenizers.items() if target is not None and not same_tokenizer(target, t)}
    config = SAEMergedConfig(
        sources=[{"name": name, "config": model.config.to_dict(), "layers": list(layers[name]),
                  "d_model": saes[0][name].cfg.d_in,
                  "reference": references[name], "own_tokenizer": name in own}
                 for name, model in sources.items()],
        target=merge.target, inject=merge.inject,  # None: every source but the target (the config's default)
        combine=merge.combine, scale=merge.scale, heads=merge.heads, gates=merge.gates, bridge=merge.bridge,
        latent={"d_sae": latent.d_sae, "activation": latent.activation, "k": latent.k, "bias": latent.bias},
        storage=storage)
    model = SAEMergedForCausalLM(config, sources=sources, saes=saes).eval()
    if own:
        model.set_tokenizers(tokenizers)
    return model


def build_merged(recipe: Recipe, sources: dict, saes: list[dict[str, SparseAutoencoder]],
                 paths: dict[str, list[str]]) -> SAEMergedForCausalLM:
    """`merged_model` as the recipe says, its sources' references and tokenizers from the recipe."""
    return merged_model(sources, saes, paths, recipe.merge, {n: reference(recipe.source(n)) for n in sources},
                        recipe.save.storage, {n: load_tokenizer(recipe.source(n)) for n in sources})
