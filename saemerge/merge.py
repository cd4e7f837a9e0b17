"""The pipeline a recipe runs: check -> harvest + train -> build -> save -> evaluate -> report."""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from .build import build_merged
from .calibrate import calibrate
from .card import write_model_card
from .data import open_mixture
from .evaluate import evaluate
from .recipe import Recipe, RecipeError, recipe_yaml
from .report import plot_training, write_report
from .sources import check_sources, load_source, load_tokenizer, resolve_device
from .train import train_saes


def validate(recipe: Recipe, output: str | Path | None = None, overwrite: bool = False) -> dict[str, str]:
    """Every check that can run before training; returns {source: module paths of its layers}."""
    output = Path(output or recipe.output)
    errors = []
    if output.exists() and not overwrite:
        errors.append(f"output: '{output}' already exists; expected a new folder (or pass --overwrite)")
    if output.exists() and not output.is_dir():
        errors.append(f"output: '{output}' is a file; expected a folder")
    try:
        paths = check_sources(recipe)
    except RecipeError as e:
        errors += e.lines
    try:
        open_mixture(recipe.data, recipe.train.seed)
    except RecipeError as e:
        errors += e.lines
    if recipe.eval.include_path and not Path(recipe.eval.include_path).is_dir():
        errors.append(f"eval.include_path: folder '{recipe.eval.include_path}' does not exist")
    if errors:
        raise RecipeError(errors)
    return paths


def save_atomically(model, tokenizer, recipe: Recipe, saes: dict, metrics: dict, log: Path, output: Path,
                    overwrite: bool) -> None:
    """Write everything into a temporary folder beside `output`, then rename it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, max_shard_size=recipe.save.max_shard_size)
        tokenizer.save_pretrained(tmp)
        for site, site_metrics in zip(saes, metrics["sites"]):
            for name, sae in site.items():
                sae.save(tmp / "saes" / name / site_metrics["layers"][name])
        (tmp / "recipe.yaml").write_text(recipe_yaml(recipe))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        shutil.copy(log, tmp / "training_log.jsonl")
        plot_training(log, tmp / "training_curves.png")
        if output.exists() and overwrite:
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def timed(timings: dict, key: str):
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 2)


def merge(recipe: Recipe, output: str | Path | None = None, overwrite: bool = False, progress: bool = True,
          evaluate_after: bool = True) -> Path:
    """Run a whole recipe; return the folder of the merged model."""
    output = Path(output or recipe.output)
    timings = {}
    with timed(timings, "load"):
        paths = validate(recipe, output, overwrite)
        tokenizer = load_tokenizer(recipe.models[0])
        device = resolve_device(recipe.train.device)
        sources = {spec.name: load_source(spec, device) for spec in recipe.models}

    output.parent.mkdir(parents=True, exist_ok=True)
    log = output.parent / f".{output.name}.training_log-{os.getpid()}.jsonl"
    try:
        with timed(timings, "train"):
            saes, metrics = train_saes(recipe, sources, paths, tokenizer, log_path=log, progress=progress)
        model = build_merged(recipe, sources, saes, paths)
        with timed(timings, "calibrate"):
            calibration = calibrate(model, recipe, tokenizer, progress=progress)
        if calibration:
            metrics["calibration"] = calibration
        metrics["timings"] = timings
        with timed(timings, "save"):
            save_atomically(model, tokenizer, recipe, saes, metrics, log, output, overwrite)
    finally:
        log.unlink(missing_ok=True)

    results = None
    if evaluate_after and recipe.eval.tasks:
        with timed(timings, "evaluate"):
            results = evaluate(model, tokenizer, recipe.eval.tasks, recipe.eval.include_path, recipe.eval.limit,
                               recipe.eval.batch_size, output=output / "eval_results.json",
                               max_length=recipe.eval.max_length)
    metrics["timings"] = timings
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(output, recipe, metrics, results)
    write_model_card(output)  # after the report: the card has the eval table
    return output
