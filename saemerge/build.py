"""Assemble the merged model from trained sources and SAEs."""

from __future__ import annotations

from .modeling import SAEMergedConfig, SAEMergedForCausalLM
from .recipe import Recipe
from .sae import SparseAutoencoder
from .sources import reference


def build_merged(recipe: Recipe, sources: dict, saes: list[dict[str, SparseAutoencoder]],
                 paths: dict[str, list[str]]) -> SAEMergedForCausalLM:
    """Sources are used as they are (not copied); the result is in eval mode."""
    latent = {"d_sae": recipe.latent.size, "activation": recipe.latent.activation, "k": recipe.latent.k,
              "bias": recipe.latent.bias}
    config = SAEMergedConfig(
        sources=[{"name": name, "config": model.config.to_dict(), "layers": paths[name],
                  "d_model": saes[0][name].cfg.d_in, "reference": reference(recipe.source(name))}
                 for name, model in sources.items()],
        target=recipe.merge.target, inject=recipe.injecting, combine=recipe.merge.combine,
        scale=recipe.merge.scale, heads=recipe.merge.heads, gates=recipe.merge.gates, latent=latent,
        storage=recipe.save.storage)
    return SAEMergedForCausalLM(config, sources=sources, saes=saes).eval()
