"""Dictionaries of a model at many sites, without a merge: `saemerge train-saes recipe.yaml`.

A site is any module path (the residual stream after a block, an attention output, an MLP output); the harvest runs
each source once, up to its deepest site, for all of them. With one source every site gets an SAE of its own; with
several (a merge recipe, its merge-only sections ignored) the sources' SAEs of a site share a latent space, as in a
merge. The folder holds the SAEs as a merged model's `saes/` does, so analyze, export-saes and the feature analyses
(feature_links, circuits, feature_evolution) read it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import distributed
from .checkpoint import STATE, checkpoint_folder
from .checks import validate
from .errors import RecipeError
from .files import inside, move_into_place
from .pipeline import load_sources, train_from_recipe
from .recipe import SAERecipe, parse_recipe, recipe_yaml
from .report import plot_training
from .sae import SparseAutoencoder
from .sources import load_tokenizer


def train_dictionaries(recipe: SAERecipe, output: str | Path | None = None, overwrite: bool = False,
                       resume: bool = False, progress: bool = True, allow_pickle: bool = False) -> Path | None:
    """Train the recipe's SAEs and write them with their metrics into `output` (default: the recipe's); atomic,
    resumable from the checkpoint beside the output like a merge. Returns the folder (None in helper processes)."""
    distributed.init()
    output = Path(output or recipe.output)
    paths = validate(recipe, output, overwrite, resume, allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(recipe.models[0])
    sources = load_sources(recipe, allow_pickle)
    checkpoint = checkpoint_folder(output)
    if not resume and distributed.is_main():
        shutil.rmtree(checkpoint, ignore_errors=True)
    try:
        saes, metrics = train_from_recipe(recipe, sources, paths, tokenizer, checkpoint, resume, progress)
    except BaseException:
        if distributed.is_main() and not (checkpoint / STATE).is_file():
            shutil.rmtree(checkpoint, ignore_errors=True)
        raise
    if not distributed.is_main():
        return None
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-dictionaries"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for site, site_metrics in zip(saes, metrics["sites"]):
            for name, sae in site.items():
                sae.save(inside(tmp, "saes", name, site_metrics["layers"][name]))
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "recipe.yaml").write_text(recipe_yaml(recipe))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        shutil.copy(checkpoint / "training_log.jsonl", tmp / "training_log.jsonl")
        plot_training(tmp / "training_log.jsonl", tmp / "training_curves.png")
        (tmp / "README.md").write_text(summary(recipe, metrics))
        move_into_place(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(checkpoint, ignore_errors=True)
    return output


def summary(recipe: SAERecipe, metrics: dict) -> str:
    """A markdown table: one row per site and source with the held-out metrics."""
    lines = [f"# {recipe.name}: dictionaries", "", f"{metrics['steps']} steps, {metrics['train_tokens']:,} tokens, "
             f"{recipe.latent.size} latents ({recipe.latent.activation}, k {recipe.latent.k}).", "",
             "| source | site | explained variance | L0 | dead |", "|---|---|---|---|---|"]
    for site in metrics["sites"]:
        for name, path in site["layers"].items():
            m = site["sources"][name]
            lines.append(f"| {name} | `{path}` | {m['explained_variance']:.3f} | {m['l0']:.1f} | "
                         f"{m['dead_fraction']:.1%} |")
    return "\n".join(lines) + "\n"


@dataclass
class Dictionaries:
    """One source's SAEs, in the recipe's site order (shallow to deep as the recipe lists them)."""
    recipe: SAERecipe
    source: str
    paths: list[str]  # module path of each site
    saes: list[SparseAutoencoder]
    folder: Path

    @property
    def spec(self):
        return self.recipe.source(self.source)


def load_dictionaries(folder: str | Path, source: str | None = None, device: str = "cpu") -> Dictionaries:
    """The SAEs of a `train-saes` folder (or a merged model's folder) for `source` (default: the first)."""
    folder = Path(folder)
    if not (folder / "recipe.yaml").is_file() or not (folder / "saes").is_dir():
        raise RecipeError(f"{folder}: no recipe.yaml and saes/; expected a folder written by `saemerge train-saes` "
                          "or `saemerge merge`")
    recipe = parse_recipe(yaml.safe_load((folder / "recipe.yaml").read_text()), str(folder / "recipe.yaml"),
                          schema=SAERecipe)
    names = [s.name for s in recipe.models]
    source = source or names[0]
    if source not in names:
        raise RecipeError(f"--source: '{source}' is not a source of {folder}; expected one of {names}")
    metrics = json.loads((folder / "metrics.json").read_text())
    paths = [site["layers"][source] for site in metrics["sites"]]
    saes = [SparseAutoencoder.load(inside(folder, "saes", source, path), device).eval() for path in paths]
    return Dictionaries(recipe, source, paths, saes, folder)
