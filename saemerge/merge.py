"""The pipeline a recipe runs: check -> harvest + train -> build -> save -> evaluate -> report."""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from . import distributed
from .build import build_merged
from .calibrate import calibrate
from .checkpoint import STATE
from .card import write_model_card
from .data import open_mixture
from .evaluate import evaluate
from .modeling import DTYPES
from .files import move_into_place, write_atomic
from .recipe import Recipe, RecipeError, recipe_yaml
from .report import plot_training, write_report
from .sources import (one_line, build_skeleton, check_sources, layer_width, load_source, load_tokenizer,
                      resolve_device)
from .train import train_saes


def validate(recipe: Recipe, output: str | Path | None = None, overwrite: bool = False,
             resume: bool = False, allow_pickle: bool = False) -> dict[str, str]:
    """Every check that can run before training; returns {source: module paths of its layers}. Pickled weights
    are refused unless `allow_pickle` (an argument, never a recipe field: a recipe from someone else cannot opt in)."""
    output = Path(output or recipe.output)
    if (size := len(output.name.encode("utf-8", "surrogatepass"))) > 200:  # filesystems allow 255 bytes
        raise RecipeError(f"output: a folder name of {size} bytes; expected at most 200 (the hidden working files "
                          "beside it are named after it, plus a suffix)")  # before any of them is looked at
    errors = []
    checkpoint = checkpoint_folder(output)
    if resume and not (checkpoint / STATE).is_file():
        errors.append(f"--resume: no checkpoint at '{checkpoint}'; expected one left by an interrupted run of this "
                      "recipe with this output folder")
    elif (checkpoint / STATE).is_file() and not (resume or overwrite):
        errors.append(f"output: an interrupted run left a checkpoint at '{checkpoint}'; pass --resume to continue "
                      "it or --overwrite to start over")
    if output.exists() and not overwrite:
        errors.append(f"output: '{output}' already exists; expected a new folder (or pass --overwrite)")
    if output.exists() and not output.is_dir():
        errors.append(f"output: '{output}' is a file; expected a folder")
    try:
        paths = check_sources(recipe, allow_pickle)
        errors += check_output(recipe, output, paths)
    except RecipeError as e:
        errors += e.lines
    try:
        open_mixture(recipe.data, recipe.train.seed)
    except RecipeError as e:
        errors += e.lines
    try:
        resolve_device(recipe.train.device)
    except RecipeError as e:
        errors += e.lines
    if recipe.data.cache:
        cache = Path(recipe.data.cache)
        if cache.exists() and not cache.is_dir():
            errors.append(f"data.cache: '{cache}' is a file; expected a folder")
        elif cache.resolve().is_relative_to(output.resolve()):
            errors.append(f"data.cache: '{cache}' is inside the output folder, which a merge replaces whole; "
                          "expected a folder elsewhere")
    sequences = max(1, recipe.train.batch_tokens // recipe.data.seq_len)
    if sequences % distributed.world():
        errors.append(f"train.batch_tokens: {sequences} sequences per step cannot be shared by {distributed.world()} "
                      f"processes; expected a multiple of {distributed.world() * recipe.data.seq_len} tokens")
    if recipe.eval.include_path and not Path(recipe.eval.include_path).is_dir():
        errors.append(f"eval.include_path: folder '{recipe.eval.include_path}' does not exist")
    if errors:
        raise RecipeError(errors)
    return paths


def check_output(recipe: Recipe, output: Path, paths: dict[str, list[str]]) -> list[str]:
    """Where the merge writes: every SAE folder inside the output folder, and room on its disk."""
    errors = []
    try:
        for i, spec in enumerate(recipe.models):
            for path in paths[spec.name]:
                try:
                    inside(output, "saes", spec.name, path)
                except RecipeError as e:
                    errors += [f"models.{i}.layer: {line}" for line in e.lines]
        return errors + check_disk(recipe, output, paths)
    except (OSError, ValueError) as e:  # a NUL byte, an unencodable name: no such folder can exist
        return errors + [f"output: cannot write to {str(output)!r}: {e}; expected a folder path"]


def inside(root: Path, *parts: str) -> Path:
    """root/parts, or a RecipeError if that resolves outside root: names from a recipe or a model never write
    elsewhere."""
    path = Path(root, *parts)
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise RecipeError(f"'{Path(*parts)}' would be written outside '{root}'; expected a path inside it")
    return path


def output_bytes(recipe: Recipe, paths: dict[str, list[str]]) -> int:
    """About how many bytes a merge writes, from the sources' shapes: their weights in the recipe's dtypes
    (self-contained storage), every SAE twice (in model.safetensors and saes/: W_enc and W_dec in float32),
    and 10 MB for the tokenizer, code, report and plots."""
    total = 10 * 10**6
    for spec in recipe.models:
        skeleton = build_skeleton(spec)
        if recipe.save.storage == "self-contained":
            total += sum(p.numel() for p in skeleton.parameters()) * DTYPES[spec.dtype].itemsize
        for path in paths[spec.name]:
            d_in = layer_width(skeleton, path) or skeleton.config.get_text_config().hidden_size
            total += 2 * (2 * d_in * recipe.latent.size * 4)
    return total


def size_text(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_disk(recipe: Recipe, output: Path, paths: dict[str, list[str]]) -> list[str]:
    """One line if the disk the output goes to has less free space than the merge writes, plus 10%."""
    need = output_bytes(recipe, paths)
    existing = output.resolve()
    while not existing.exists():  # the output and its parents may not exist yet
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free >= need * 1.1:
        return []
    return [f"output: the merge will write about {size_text(need)} to '{output}', which has {size_text(free)} "
            f"free; expected at least {size_text(need * 1.1)} free"]


def save_atomically(model, tokenizer, recipe: Recipe, saes: dict, metrics: dict, log: Path, output: Path,
                    overwrite: bool) -> None:
    """Write everything into a hidden temporary folder beside `output`, then rename it into place: the folder at
    `output` is never half written (see files.move_into_place for --overwrite)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, max_shard_size=recipe.save.max_shard_size)
        tokenizer.save_pretrained(tmp)
        for site, site_metrics in zip(saes, metrics["sites"]):
            for name, sae in site.items():
                sae.save(inside(tmp, "saes", name, site_metrics["layers"][name]))
        (tmp / "recipe.yaml").write_text(recipe_yaml(recipe))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        shutil.copy(log, tmp / "training_log.jsonl")
        plot_training(log, tmp / "training_curves.png")
        write_report(tmp, recipe, metrics, None)  # complete from the first instant; rewritten at the end
        write_model_card(tmp, repo_id=output.name)
        move_into_place(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def timed(timings: dict, key: str):
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 2)


def checkpoint_folder(output: Path) -> Path:
    """Where training checkpoints of a run writing `output` live: hidden, beside it."""
    return output.parent / f".{output.name}.checkpoint"


def merge(recipe: Recipe, output: str | Path | None = None, overwrite: bool = False, progress: bool = True,
          evaluate_after: bool = True, resume: bool = False, allow_pickle: bool = False) -> Path | None:
    """Run a whole recipe; return the folder of the merged model. `resume` continues the training of an
    interrupted run from its checkpoint (beside the output folder), which is removed once the output is saved.

    Started by a launcher with several processes (see distributed.py), all of them train; the first then goes on
    alone (calibration, saving, evaluation) and the others return None."""
    distributed.init()
    output = Path(output or recipe.output)
    timings = {}
    with timed(timings, "load"):
        paths = validate(recipe, output, overwrite, resume, allow_pickle=allow_pickle)
        tokenizer = load_tokenizer(recipe.models[0])
        device = distributed.device(resolve_device(recipe.train.device))
        sources, errors = {}, []
        for i, spec in enumerate(recipe.models):
            try:
                sources[spec.name] = load_source(spec, device, allow_pickle)
            except Exception as e:  # e.g. a Hub repo with pickles only, which validate cannot see: one line each
                errors.append(f"models.{i}: cannot load '{spec.model}': {one_line(e)}")
        if errors:
            raise RecipeError(errors)

    checkpoint = checkpoint_folder(output)
    if not resume and distributed.is_main():
        shutil.rmtree(checkpoint, ignore_errors=True)  # validate allowed it: --overwrite
    try:
        with timed(timings, "train"):
            saes, metrics = train_saes(recipe, sources, paths, tokenizer, progress=progress, checkpoint=checkpoint,
                                       resume=resume)
    except BaseException:
        if distributed.is_main() and not (checkpoint / STATE).is_file():  # nothing worth keeping
            shutil.rmtree(checkpoint, ignore_errors=True)
        raise
    if not distributed.is_main():
        return None
    model = build_merged(recipe, sources, saes, paths)
    with timed(timings, "calibrate"):
        calibration = calibrate(model, recipe, tokenizer, progress=progress)
    if calibration:
        metrics["calibration"] = calibration
    metrics["timings"] = timings
    with timed(timings, "save"):
        save_atomically(model, tokenizer, recipe, saes, metrics, checkpoint / "training_log.jsonl", output, overwrite)
    shutil.rmtree(checkpoint, ignore_errors=True)

    results = None
    if evaluate_after and recipe.eval.tasks:
        with timed(timings, "evaluate"):
            results = evaluate(model, tokenizer, recipe.eval.tasks, recipe.eval.include_path, recipe.eval.limit,
                               recipe.eval.batch_size, output=output / "eval_results.json",
                               max_length=recipe.eval.max_length)
    metrics["timings"] = timings
    write_atomic(output / "metrics.json", json.dumps(metrics, indent=2))  # the output is complete at every instant
    write_report(output, recipe, metrics, results)
    write_model_card(output)  # after the report: the card has the eval table
    return output
