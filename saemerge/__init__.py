"""saemerge: merge Hugging Face causal LMs through sparse autoencoders that share one latent space.

Pipeline, one module each: recipe -> checks -> sources -> harvest -> train (losses, metrics) -> build (modeling)
-> calibrate -> evaluate -> report; pipeline.merge runs them all as a recipe says, then distill (one student model
trained on the merged model's distribution) if the recipe has a `distill:` section. analyze compares SAE dictionaries;
stitching fits affine maps between two models' residual streams. dictionaries trains SAEs at many sites of one
model (`saemerge train-saes`); feature_intervention edits features and takes gradients with respect to them.
Importing saemerge registers `SAEMergedForCausalLM` with transformers' Auto classes.
"""

from .activation_measures import compare_activations
from .analyze import analyze, compare_saes
from .browser import build_report
from .build import build_merged, merged_model
from .checks import check_sources, validate
from .dictionaries import load_dictionaries, train_dictionaries
from .distill import distill
from .feature_intervention import run_features
from .errors import HubError, RecipeError, UserError
from .evaluate import evaluate, load_merged
from .harvest import activation_batches, recipe_batches
from .hooks import ResidualHook, find_blocks, resolve_layer, run_to_layer
from .metrics import measure
from .modeling import SAEMergedConfig, SAEMergedForCausalLM, register_auto_classes
from .pipeline import merge, train_from_recipe
from .recipe import DistillSpec, LatentSpec, MergeSpec, Recipe, SAERecipe, TrainSpec, load_recipe, parse_recipe
from .sae import SAEConfig, SparseAutoencoder
from .sources import load_source, load_tokenizer
from .stitching import fit_stitch, stitch_scan
from .toy import ToyFeatures, recovery
from .train import train_saes

register_auto_classes()

__version__ = "0.1.0"
__all__ = [
    "Recipe", "DistillSpec", "LatentSpec", "TrainSpec", "MergeSpec", "UserError", "RecipeError", "HubError", "load_recipe",
    "parse_recipe", "validate", "merge", "train_from_recipe", "check_sources", "load_source", "load_tokenizer",
    "find_blocks", "resolve_layer", "run_to_layer", "ResidualHook", "activation_batches", "recipe_batches",
    "SAEConfig", "SparseAutoencoder", "train_saes", "measure", "merged_model", "build_merged", "SAEMergedConfig",
    "SAEMergedForCausalLM", "evaluate", "load_merged", "analyze", "compare_saes",
    "ToyFeatures", "recovery",
    "compare_activations", "build_report",
    "fit_stitch", "stitch_scan", "distill", "SAERecipe", "train_dictionaries", "load_dictionaries", "run_features",
]
