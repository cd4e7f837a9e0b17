"""The pipeline a recipe runs: check -> load -> harvest + train -> build -> calibrate -> save -> evaluate -> report.
Each stage is a library call of its own (train.train_saes, build.merged_model, ...); this module only feeds them
the recipe's settings."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from . import distributed
from .build import build_merged
from .calibrate import calibrate
from .card import write_model_card
from .checkpoint import STATE, checkpoint_folder, training_settings
from .checks import validate
from .distill import default_output, distill
from .errors import RecipeError
from .evaluate import evaluate
from .files import inside, move_into_place, write_atomic
from .harvest import recipe_batches
from .recipe import Recipe, recipe_yaml
from .report import plot_training, write_report
from .sources import load_source, load_tokenizer, one_line, resolve_device
from .train import init_batches, train_saes


def load_sources(recipe: Recipe, allow_pickle: bool = False) -> dict:
    """Every source of the recipe, frozen, on `train.device` (or its device map); one line per source that fails."""
    device = distributed.device(resolve_device(recipe.train.device))
    sources, errors = {}, []
    for i, spec in enumerate(recipe.models):
        try:
            sources[spec.name] = load_source(spec, device, allow_pickle)
        except Exception as e:  # e.g. a Hub repo with pickles only, which validate cannot see: one line each
            errors.append(f"models.{i}: cannot load '{spec.model}': {one_line(e)}")
    if errors:
        raise RecipeError(errors)
    return sources


def train_from_recipe(recipe: Recipe, sources: dict, paths: dict[str, list[str]], tokenizer,
                      checkpoint: str | Path | None = None, resume: bool = False,
                      progress: bool = True) -> tuple[list[dict], dict]:
    """`train_saes` on the recipe's data, latent and training settings; metrics measured on held-back batches (as
    one process forms them) from the first shuffle block that no training or initialisation batch drew from,
    unshuffled, so that no more is harvested than measured."""
    batch_size = max(1, recipe.train.batch_tokens // recipe.data.seq_len)  # sequences, all processes together
    steps = max(1, math.ceil(recipe.data.tokens / (batch_size * recipe.data.seq_len)))
    world, rank = distributed.world(), distributed.rank()
    block = recipe.train.shuffle_batches
    first = init_batches(recipe.latent, batch_size * (recipe.data.seq_len - 1))  # position 0 is left out
    unseen = math.ceil(max(steps, first) / block) * block

    def held_back():
        batches, tokens = recipe_batches(recipe, sources, paths, tokenizer, batch_size, unseen, shuffle=False), 0
        while tokens < recipe.train.eval_tokens:  # eval_tokens activations are kept; codes only batch by batch
            batch = next(batches)
            tokens += len(next(iter(batch[0].values())))
            yield batch

    saes, metrics = train_saes(
        lambda start: recipe_batches(recipe, sources, paths, tokenizer, batch_size // world, start, rank, world),
        recipe.latent, recipe.train, steps, held_back=held_back() if distributed.is_main() else None,
        start_from={s.name: s.sae_folders for s in recipe.models if s.sae}, checkpoint=checkpoint, resume=resume,
        settings=training_settings(recipe), progress=progress, tokens_per_step=batch_size * recipe.data.seq_len)
    for site, measured in enumerate(metrics.get("sites", [])):
        metrics["sites"][site] = {"layers": {n: paths[n][site] for n in sources}, **measured}
    return saes, metrics


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


def merge(recipe: Recipe, output: str | Path | None = None, overwrite: bool = False, progress: bool = True,
          evaluate_after: bool = True, resume: bool = False, allow_pickle: bool = False) -> Path | None:
    """Run a whole recipe; return the folder of the merged model. `resume` continues the training of an
    interrupted run from its checkpoint (beside the output folder), which is removed once the output is saved.
    A `distill:` section then distils the merged model into a student folder (distill.py); an interrupted
    distillation continues with `saemerge distill OUTPUT --resume`.

    Started by a launcher with several processes (see distributed.py), all of them train; the first then goes on
    alone (calibration, saving, evaluation) and the others return None."""
    distributed.init()
    output = Path(output or recipe.output)
    timings = {}
    with timed(timings, "load"):
        paths = validate(recipe, output, overwrite, resume, allow_pickle=allow_pickle)
        tokenizer = load_tokenizer(recipe.source(recipe.merge.target))  # what the merged model reads and writes
        sources = load_sources(recipe, allow_pickle)

    checkpoint = checkpoint_folder(output)
    if not resume and distributed.is_main():
        shutil.rmtree(checkpoint, ignore_errors=True)  # validate allowed it: --overwrite
    try:
        with timed(timings, "train"):
            saes, metrics = train_from_recipe(recipe, sources, paths, tokenizer, checkpoint, resume, progress)
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
    if recipe.distill is not None:
        distill(model, recipe, tokenizer, default_output(recipe, output), overwrite=overwrite, progress=progress,
                evaluate_after=evaluate_after, allow_pickle=allow_pickle, teacher_name=output.name)
    return output
