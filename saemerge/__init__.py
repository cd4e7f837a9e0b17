"""saemerge: merge Hugging Face causal LMs through sparse autoencoders that share one latent space.

Pipeline, one module each: recipe -> sources -> harvest -> train -> build (modeling) -> merge -> evaluate -> report.
Importing saemerge registers `SAEMergedForCausalLM` with transformers' Auto classes.
"""

from .build import build_merged
from .evaluate import evaluate, load_merged
from .hooks import ResidualHook, find_blocks, resolve_layer, run_to_layer
from .merge import merge, validate
from .modeling import SAEMergedConfig, SAEMergedForCausalLM, register_auto_classes
from .recipe import Recipe, RecipeError, load_recipe, parse_recipe
from .sae import SAEConfig, SparseAutoencoder
from .sources import check_sources, load_source, load_tokenizer
from .train import measure, train_saes

register_auto_classes()

__version__ = "0.1.0"
__all__ = [
    "Recipe", "RecipeError", "load_recipe", "parse_recipe", "validate", "merge", "check_sources", "load_source",
    "load_tokenizer", "find_blocks", "resolve_layer", "run_to_layer", "ResidualHook", "SAEConfig",
    "SparseAutoencoder", "train_saes", "measure", "build_merged", "SAEMergedConfig", "SAEMergedForCausalLM",
    "evaluate", "load_merged",
]
