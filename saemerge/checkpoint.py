"""Training checkpoints: everything needed to continue a run exactly — SAE weights, Adam's moments, the learning
rate schedule, random states and the position in the data stream — in safetensors + JSON (no pickles).

A checkpoint folder holds `step-<n>.safetensors` and `state.json`, which names it; `state.json` is replaced
atomically after the tensors are written, so a kill at any moment leaves the previous checkpoint readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .recipe import Recipe

STATE = "state.json"


def checkpoint_folder(output: Path) -> Path:
    """Where training checkpoints of a run writing `output` live: hidden, beside it."""
    return output.parent / f".{output.name}.checkpoint"


def training_settings(recipe: Recipe) -> dict:
    """What a resumed run must share with the interrupted one. `train.lr` may change (say, lowered after a
    divergence), and so may where and how often things are logged or saved."""
    settings = recipe.model_dump(mode="json", include={"models", "latent", "data", "train"})
    for key in ("lr", "checkpoint_every", "log_every", "device"):
        settings["train"].pop(key)
    settings["data"].pop("cache")  # where activations are cached does not change them
    return settings


def changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [f for k in sorted(set(old) | set(new), key=str)
                for f in changed_fields(old.get(k), new.get(k), f"{prefix}{k}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [f for i, (a, b) in enumerate(zip(old, new)) for f in changed_fields(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".")]


def save(folder: Path, step: int, saes: list[dict], optimizer, schedule, generator: torch.Generator,
         fired: list[torch.Tensor], settings: dict, **extra) -> None:
    """Write the state of SAE training after `step` steps. Non-finite SAE weights are never written (ValueError)."""
    tensors = {f"sae.{site}.{name}.{key}": value for site, group in enumerate(saes)
               for name, sae in group.items() for key, value in sae.state_dict().items()}
    tensors |= {f"fired.{site}": f for site, f in enumerate(fired)} | {"rng.generator": generator.get_state()}
    write(folder, step, tensors, optimizer, schedule, settings, **extra)


def write(folder: Path, step: int, tensors: dict[str, torch.Tensor], optimizer, schedule, settings: dict,
          **extra) -> None:
    """Write `tensors` (what was trained), Adam's state, the schedule and torch's random state after `step` steps;
    state.json last. Non-finite weights are never written (ValueError)."""
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise ValueError("non-finite weights")
    optim = optimizer.state_dict()
    tensors = dict(tensors)
    for index, state in optim["state"].items():
        for key, value in state.items():
            tensors[f"adam.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, folder / name)
    schedule_state = {k: v for k, v in schedule.state_dict().items() if k != "lr_lambdas"}
    state = {"step": step, "tensors": name, "param_groups": optim["param_groups"], "schedule": schedule_state,
             "settings": settings, **extra}
    tmp = folder / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, folder / STATE)
    for old in folder.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink()


def load(folder: Path, settings: dict, may_change: str = "train.lr, train.log_every, train.checkpoint_every and "
         "train.device") -> tuple[dict, dict[str, torch.Tensor]]:
    """The state and tensors of the checkpoint in `folder`; UserError if there is none or the recipe's
    training settings differ from the checkpoint's (`may_change` names those that may)."""
    if not (folder / STATE).is_file():
        raise UserError(f"--resume: no checkpoint in '{folder}'; expected one left by an interrupted run of this "
                        "recipe with this output folder")
    state = json.loads((folder / STATE).read_text())
    changed = changed_fields(state["settings"], settings)
    if changed:
        raise UserError(f"--resume: the checkpoint in '{folder}' was made with other settings ({', '.join(changed)}); "
                        f"expected the same recipe (only {may_change} may change), or start over with --overwrite")
    return state, load_file(folder / state["tensors"])


def restore(state: dict, tensors: dict, saes: list[dict], optimizer, schedule, generator: torch.Generator,
            fired: list[torch.Tensor], lr: float) -> None:
    """Put a loaded checkpoint back into freshly built SAEs, optimizer, schedule, generator and dead-latent masks."""
    for site, group in enumerate(saes):
        for name, sae in group.items():
            prefix = f"sae.{site}.{name}."
            sae.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    restore_optimizer(state, tensors, optimizer, schedule, lr)
    for site, f in enumerate(fired):
        f.copy_(tensors[f"fired.{site}"])
    generator.set_state(tensors["rng.generator"])


def restore_optimizer(state: dict, tensors: dict, optimizer, schedule, lr: float) -> None:
    """Adam's moments, the schedule (a new `lr` takes effect at the point reached) and torch's random state."""
    adam = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, field = key.split(".", 2)
            adam.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": adam, "param_groups": state["param_groups"]})
    schedule.load_state_dict({**state["schedule"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] / group["initial_lr"] * lr
        group["initial_lr"] = lr
    schedule.base_lrs = [lr] * len(optimizer.param_groups)
    torch.set_rng_state(tensors["rng.torch"])
