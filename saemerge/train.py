"""SAE training: at every site one SAE per source, all sharing one latent space (the loss: losses.py).

It takes a stream of activation batches and the `latent` and `train` settings, not a recipe, so it trains one SAE
on one model's layer as well as several aligned across models. A batch is a list over sites of {source:
[tokens, d]}; `stream(start)` yields batches from batch `start` on (what a resumed run needs), or `stream` is any
iterable of batches. With several processes (distributed.py) each trains on its share of every batch.

    from saemerge import LatentSpec, TrainSpec, train_saes
    saes, metrics = train_saes(batches, LatentSpec(size=1024, activation="topk", k=32), TrainSpec(), steps=500)
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from . import checkpoint as checkpoint_io
from . import distributed
from .errors import RecipeError, UserError
from .interchange import import_sae
from .losses import loss_terms
from .metrics import measure
from .recipe import LatentSpec, TrainSpec
from .sae import SAEConfig, SparseAutoencoder
from .sources import resolve_device

Batch = list[dict[str, torch.Tensor]]  # per site, {source: activations [tokens, d]}


def resampling_due(step: int, steps: int, every: int) -> bool:
    """Dead latents are restarted every `every` steps (0: never), not at step 0 (nothing has had a chance to fire)
    and not in the last fifth of training, which is left to settle."""
    return bool(every) and step % every == 0 and 0 < step < 0.8 * steps


def lr_factor(step: int, steps: int) -> float:
    """Cosine decay of the learning rate from 1 to 0.1 of `train.lr` over the run."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def init_batches(latent: LatentSpec, tokens_per_batch: int) -> int:
    """Batches drawn before the first step: with `init: data`, enough tokens to give every latent its own."""
    return math.ceil(latent.size / tokens_per_batch) if latent.init == "data" else 1


def new_sae(latent: LatentSpec, d_in: int) -> SparseAutoencoder:
    return SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=latent.size, k=latent.k, activation=latent.activation,
                                       bias=latent.bias))


@torch.no_grad()
def resample_dead(saes: dict[str, SparseAutoencoder], acts: dict[str, torch.Tensor], dead: torch.Tensor,
                  optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
    """Restart the latents dead in every source on tokens the SAEs reconstruct worst, using the SAME tokens
    for every source so that a restarted slot is aligned across models from its first step."""
    latents = dead.nonzero().flatten()
    if len(latents) == 0:
        return 0
    errors = {n: (x - saes[n](x)) / saes[n].act_scale for n, x in acts.items()}  # in each SAE's normalised units
    badness = sum(e.pow(2).sum(-1) for e in errors.values())
    tokens = torch.multinomial(badness.cpu() + 1e-12, len(latents), replacement=len(latents) > len(badness),
                               generator=generator).to(badness.device)
    for name, sae in saes.items():
        sae.resample(latents, errors[name][tokens])
        for param in (sae.W_enc, sae.W_dec, sae.b_enc):  # forget Adam's moments of the restarted latents
            for moment in optimizer.state.get(param, {}).values():
                if moment.dim() == 0:
                    continue
                if param is sae.W_enc:
                    moment[:, latents] = 0
                else:
                    moment[latents] = 0
    return len(latents)


@torch.no_grad()
def start_from_file(sae: SparseAutoencoder, folder: str, x: torch.Tensor) -> None:
    """Make `sae` compute what the SAE in `folder` (saemerge, SAELens or sparsify format) computes, in the units
    the trainer expects. The input scale comes from the data `x` as for a fresh SAE, so penalties and learning
    rate mean the same for every source (the weights are rescaled to match: exact). Decoder rows are brought to
    unit norm, as the trainer keeps them, each row's norm moved into its encoder column and b_enc: exact for
    ReLU; for TopK the k latents are then ranked by norm * pre-activation, which may change the choice when the
    file's rows were not unit-norm (our exports' rows all have norm act_scale, which keeps the choice)."""
    src = import_sae(folder)
    if (src.cfg.d_in, src.cfg.d_sae) != (sae.cfg.d_in, sae.cfg.d_sae):
        raise RecipeError(f"sae: '{folder}' has d_in {src.cfg.d_in} and {src.cfg.d_sae} latents; expected "
                          f"{sae.cfg.d_in} (the source's layer width) and {sae.cfg.d_sae} (latent.size)")
    scale = x.float().norm(dim=-1).mean().item() / sae.cfg.d_in ** 0.5  # as in init_from_data
    ratio = src.act_scale.item() / scale
    norm = (src.W_dec * ratio).norm(dim=-1).clamp_min(1e-8)
    sae.act_scale.fill_(scale)
    sae.W_enc.copy_(src.W_enc / ratio * norm)
    sae.b_enc.copy_(src.b_enc * norm)
    sae.W_dec.copy_(src.W_dec * ratio / norm[:, None])
    sae.b_dec.copy_(src.b_dec * ratio)


def init_saes(latent: LatentSpec, first: list[Batch], start_from: dict[str, list[str]],
              generator: torch.Generator) -> list[dict[str, SparseAutoencoder]]:
    """SAEs for every site and source, from the first batches (every process's tokens): started from the files
    in `start_from` ({source: one folder per site}), else as `latent.init` says. With `init: data` latent j starts
    as the same token in every source (see SparseAutoencoder.init_from_data)."""
    tokens = sum(len(next(iter(batch[0].values()))) for batch in first)
    rows = torch.randperm(tokens, generator=generator)[: latent.size] if latent.init == "data" else None
    saes = []
    for site in range(len(first[0])):
        saes.append({})
        for name in first[0][site]:
            x = torch.cat([batch[site][name] for batch in first])
            sae = new_sae(latent, x.shape[-1])
            if name in start_from:
                start_from_file(sae, start_from[name][site], x)
            else:
                sae.init_random(generator)
                sae.init_from_data(x, rows)
            saes[site][name] = sae
    return saes


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during training; the message says where the checkpoint is."""


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops before anything non-finite is saved."""


class StopRequests:
    """SIGINT / SIGTERM while training: finish the current step, checkpoint, stop. A second signal stops at once."""

    def __enter__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class TrainingLog:
    """training_log.jsonl, one JSON line per logged step; a resumed run drops the lines from `start` on."""

    def __init__(self, path: Path | None, start: int):
        self.file = None
        if path is None or not distributed.is_main():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < start] \
            if start and path.is_file() else []
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def write(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


class Trainer:
    """Everything a run changes, and what a checkpoint holds: SAEs, Adam, the schedule, the random generator,
    which latents fired since the last resampling."""

    def __init__(self, saes: list[dict[str, SparseAutoencoder]], latent: LatentSpec, train: TrainSpec, steps: int,
                 device: torch.device, generator: torch.Generator):
        self.saes = [{n: sae.to(device) for n, sae in site.items()} for site in saes]
        self.latent, self.train, self.steps, self.generator = latent, train, steps, generator
        self.every_sae = [sae for site in self.saes for sae in site.values()]
        self.params = [p for sae in self.every_sae for p in sae.parameters()]
        distributed.broadcast(self.params + [sae.act_scale for sae in self.every_sae])  # identical replicas
        self.optimizer = torch.optim.Adam(self.params, lr=train.lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, steps))
        self.fired = [torch.zeros(latent.size, dtype=torch.bool, device=device) for _ in saes]
        self.resampled = 0
        self.tokens_per_step = None  # activations in a step, all processes together

    def resample(self, batch: Batch) -> None:
        """Restart the latents that fired in no source since the last resampling, on the whole batch,
        identically in every process."""
        for site, acts in enumerate(batch):
            distributed.or_masks(self.fired[site])
            everyone = {n: distributed.gather_rows(x) for n, x in acts.items()}
            self.resampled += resample_dead(self.saes[site], everyone, ~self.fired[site], self.optimizer,
                                            self.generator)
            self.fired[site].zero_()

    def step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step on the batch; returns this process's share of the loss terms (summed over sites)."""
        if resampling_due(step, self.steps, self.train.resample_every):
            self.resample(batch)
        device = self.fired[0].device
        self.tokens_per_step = distributed.world() * len(next(iter(batch[0].values())))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.train.autocast):
            site_parts = [loss_terms(self.latent, self.saes[site], acts, self.fired[site])
                          for site, acts in enumerate(batch)]
        parts = {key: sum(p[key] for p in site_parts) for key in site_parts[0]}
        total = distributed.all_sum(parts["total"].detach())
        if not torch.isfinite(total):
            raise FloatingPointError(total.item())
        self.optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        distributed.sum_gradients(self.params)
        for sae in self.every_sae:
            sae.remove_parallel_grads()  # the gradient along a unit decoder row would only change its norm
        self.optimizer.step()
        self.schedule.step()
        for sae in self.every_sae:
            sae.normalize_decoder()
        return parts

    def save(self, folder: Path | None, step: int, settings: dict, **extra) -> None:
        if folder and distributed.is_main():
            checkpoint_io.save(folder, step, self.saes, self.optimizer, self.schedule, self.generator, self.fired,
                               settings, resampled_latents=self.resampled, sources=list(self.saes[0]), **extra)

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        checkpoint_io.restore(state, tensors, self.saes, self.optimizer, self.schedule, self.generator, self.fired,
                              self.train.lr)
        self.resampled = state["resampled_latents"]

    def finished(self) -> list[dict[str, SparseAutoencoder]]:
        for sae in self.every_sae:
            sae.eval()
        return self.saes


def default_settings(latent: LatentSpec, train: TrainSpec, steps: int) -> dict:
    """What a resumed run must share with the interrupted one, when the caller names nothing else."""
    train = train.model_dump(mode="json", exclude={"lr", "checkpoint_every", "log_every", "device"})
    return {"latent": latent.model_dump(mode="json"), "train": train, "steps": steps}


def _first_saes(batches: Iterator[Batch], latent: LatentSpec, start_from: dict[str, list[str]],
                generator: torch.Generator) -> tuple[list[dict[str, SparseAutoencoder]], list[Batch]]:
    """New SAEs from the first batches, and those batches (this process's share), which training then starts on."""
    first, everyone = [], []
    while not first or len(first) < init_batches(latent, len(next(iter(everyone[0][0].values())))):
        first.append(next(batches))
        everyone.append([{n: distributed.gather_rows(x) for n, x in site.items()} for site in first[-1]])
    return init_saes(latent, everyone, start_from, generator), first


def _saes_of_checkpoint(state: dict, tensors: dict, latent: LatentSpec, settings: dict) -> list[dict]:
    """Empty SAEs of the checkpoint's sites, sources (in the run's order) and widths; restore fills them."""
    names = state.get("sources") or [m["name"] for m in settings["models"]]
    sites = 1 + max(int(key.split(".")[1]) for key in tensors if key.startswith("sae."))
    return [{n: new_sae(latent, tensors[f"sae.{site}.{n}.W_enc"].shape[0]) for n in names} for site in range(sites)]


def train_saes(stream: Callable[[int], Iterator[Batch]] | Iterable[Batch], latent: LatentSpec, train: TrainSpec,
               steps: int, *, held_back: Iterable[Batch] | None = None, start_from: dict[str, list[str]] | None = None,
               checkpoint: str | Path | None = None, resume: bool = False, settings: dict | None = None,
               log_path: str | Path | None = None, progress: bool = True, tokens_per_step: int | None = None,
               on_step: Callable[[int, list[dict[str, SparseAutoencoder]]], None] | None = None,
               ) -> tuple[list[dict[str, SparseAutoencoder]], dict]:
    """Train `steps` steps; return the SAEs (site-major: saes[site][source]) and their metrics, measured on the
    `held_back` batches if given. `start_from`: {source: SAE folder per site} to start from instead of fresh.

    With `checkpoint` (a folder) the state is saved every `train.checkpoint_every` steps, on SIGINT/SIGTERM (then
    TrainingInterrupted is raised) and at the end; `resume` continues from it, ending with the weights an
    uninterrupted run would have, provided `settings` (default: latent, train and steps) are the same. The log goes
    to `log_path` (default: checkpoint/training_log.jsonl); `tokens_per_step` is what it counts per step (default:
    the activations trained on). `on_step(steps_done, saes)`, if given, is called before the first step and after
    every step (to follow the SAEs during training, e.g. eval/toy_recovery.py); it must not change them. Only the
    first of several processes checkpoints, logs and measures."""
    device = distributed.device(resolve_device(train.device))
    torch.manual_seed(train.seed)
    generator = torch.Generator().manual_seed(train.seed)
    checkpoint = Path(checkpoint) if checkpoint else None
    settings = default_settings(latent, train, steps) if settings is None else settings
    open_stream = stream if callable(stream) else lambda start: itertools.islice(iter(stream), start, None)
    start = 0
    if resume:
        state, tensors = checkpoint_io.load(checkpoint, settings)
        start, batches = state["step"], open_stream(state["step"])
        trainer = Trainer(_saes_of_checkpoint(state, tensors, latent, settings), latent, train, steps, device,
                          generator)
        trainer.restore(state, tensors)
        if state.get("metrics"):  # training had finished: nothing left to do
            return trainer.finished(), state["metrics"]
    else:
        batches = open_stream(0)
        saes, first = _first_saes(batches, latent, start_from or {}, generator)
        trainer = Trainer(saes, latent, train, steps, device, generator)
        batches = itertools.chain(first, batches)
    log_path = Path(log_path) if log_path else checkpoint / "training_log.jsonl" if checkpoint else None
    _run_steps(trainer, batches, start, TrainingLog(log_path, start), checkpoint, settings, progress, tokens_per_step,
               on_step)
    if not distributed.is_main():
        return trainer.finished(), {}
    metrics = {}
    if held_back is not None:
        held = [[{n: x.to(device) for n, x in site.items()} for site in batch] for batch in held_back]
        metrics["sites"] = [measure(trainer.saes[site], [batch[site] for batch in held])
                            for site in range(len(trainer.saes))]
    per_step = tokens_per_step or trainer.tokens_per_step
    metrics |= {"steps": steps, "train_tokens": steps * per_step if per_step else None,
                "resampled_latents": trainer.resampled}
    trainer.save(checkpoint, steps, settings, metrics=metrics)  # a run stopped later resumes from here
    return trainer.finished(), metrics


def _run_steps(trainer: Trainer, batches: Iterator[Batch], start: int, log: TrainingLog, checkpoint: Path | None,
               settings: dict, progress: bool, tokens_per_step: int | None, on_step: Callable | None = None) -> None:
    steps, train, device = trainer.steps, trainer.train, trainer.fired[0].device
    last_saved = start if start else None
    bar = tqdm(range(start, steps), desc="training SAEs", disable=not (progress and distributed.is_main()),
               unit="step", initial=start, total=steps)
    if on_step is not None:
        on_step(start, trainer.saes)
    with StopRequests() as stop:
        for step in bar:
            batch = [{n: x.to(device) for n, x in acts.items()} for acts in next(batches)]
            try:
                parts = trainer.step(batch, step)
            except FloatingPointError as e:
                then = (f"continue from the last good checkpoint, '{checkpoint}' (after step {last_saved}), with "
                        "--resume (train.lr may change on resume)" if last_saved is not None else "run again")
                raise TrainingDiverged(f"train: the loss became {e} at step {step}; stopped before saving anything "
                                       f"non-finite. Expected a finite loss: lower train.lr and {then}") from None
            if step % train.log_every == 0 or step == steps - 1:
                row = {"step": step, "tokens": (step + 1) * (tokens_per_step or trainer.tokens_per_step),
                       **{k: distributed.all_sum(v.detach()).item() for k, v in parts.items()}}
                bar.set_postfix(fvu=f"{row['recon'] / len(trainer.every_sae):.3f}", align=f"{row['align']:.3f}")
                log.write(row)
            if on_step is not None:
                on_step(step + 1, trainer.saes)
            stopping = distributed.any_true(stop.signal is not None)  # every process stops at the same step
            every = train.checkpoint_every
            if stopping or (every and (step + 1) % every == 0 and step + 1 < steps):
                for fired in trainer.fired:  # every process's, so that a resumed run resamples the same latents
                    distributed.or_masks(fired)
                trainer.save(checkpoint, step + 1, settings)
                last_saved = step + 1
            if stopping:
                why = stop.signal or "a stop request to another process"
                raise TrainingInterrupted(f"{why} at step {step + 1} of {steps}; checkpoint in '{checkpoint}'"
                                          if checkpoint else f"{why} at step {step + 1} of {steps}")
    log.close()
