"""Benchmarks through lm-evaluation-harness: local task YAMLs from a folder and any registered task."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .files import write_atomic
from .errors import RecipeError, UserError


def load_merged(folder: str | Path, device: str = "cpu", allow_pickle: bool = False, dtype: str = "auto"):
    """A saved merged model (or any causal LM folder) and its tokenizer, offline, in `dtype` (float32, bfloat16,
    float16, or "auto": as saved). Pickled weights (of the folder, or of a source stored by reference) only with
    `allow_pickle`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a model folder; expected config.json inside")
    if not allow_pickle:
        kwargs = {"use_safetensors": True}
    else:  # a merged folder passes it on to its sources; other models just may read a pickle
        kwargs = {"allow_pickle": True} if AutoConfig.from_pretrained(folder).model_type == "saemerge" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device).eval()
    except OSError as e:  # a missing or pickled source or weights file: one line
        reason = str(e).strip().splitlines()[0]
        if not allow_pickle and "no file named model.safetensors" in reason:
            reason += " (pickle weights load only with --allow-pickle, if you trust them)"
        raise UserError(f"{folder}: {reason}") from None
    return model, AutoTokenizer.from_pretrained(folder)


@lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    """lm-eval indexes every task it knows when this is built (seconds): build it once per folder."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def evaluate(model, tokenizer, tasks: list[str], include_path: str | Path | None = None, limit: float | None = None,
             batch_size: int = 8, output: str | Path | None = None, max_length: int | None = None) -> dict:
    """Run lm-eval `tasks` on an in-memory model; return {task: {metric: value}} and write JSON to `output`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if include_path is not None and not Path(include_path).is_dir():
        raise RecipeError(f"eval.include_path: folder '{include_path}' does not exist")
    manager = task_manager(str(Path(include_path).resolve()) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise RecipeError(f"eval.tasks: unknown task(s) {unknown}; expected registered tasks or YAMLs in include_path")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal", max_length=max_length)
    raw = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False)
    # Keep the metrics themselves: numbers, without stderr and bookkeeping fields.
    results = {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))
                      and not k.split(",")[0].endswith("_stderr") and k not in ("sample_len", "sample_count")}
               for task, metrics in raw["results"].items()}
    if output:
        config = {"tasks": list(tasks), "limit": limit, "max_length": lm.max_length, "dtype": str(model.dtype)}
        write_atomic(output, json.dumps({"results": results, "lm_eval": raw["results"], "config": config},
                                        indent=2, default=str))
    return results


def results_table(results: dict) -> str:
    """Markdown table, one row per task and metric."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {task} | {metric} | {shown} |")
    return "\n".join(lines)
