"""Aligned training: one SAE per source, one shared latent space.

loss = sum over sources of [ FVU(x_s, Dec_s(Enc_s(x_s))) + l1 |z_s|_1 + l2 |z_s|^2 ]
     + align * mean over pairs of (1 - cos(z_s, z_t))
     + cross * mean over ordered pairs of FVU(x_t, Dec_t(z_s))
FVU (fraction of variance unexplained = 1 - explained variance) makes the reconstruction term free of each
model's activation scale, so one set of coefficients fits sources of any width and norm.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
import json
import math
import signal
import threading
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint as checkpoint_io
from . import distributed
from .harvest import activation_batches
from .interchange import import_sae
from .recipe import Recipe, RecipeError
from .sae import SAEConfig, SparseAutoencoder
from .sources import resolve_device


def fvu(x: torch.Tensor, recon: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error over the variance of x; with `variance` given (the global batch's), this process's share."""
    variance = (x - x.mean(0)).pow(2).sum() if variance is None else variance
    return (x - recon).pow(2).sum() / variance.clamp_min(1e-12)


def total_variance(x: torch.Tensor) -> torch.Tensor:
    """sum |x - mean|^2 over the global batch (all processes' tokens), from each process's count, mean and sum."""
    local = (x - x.mean(0)).pow(2).sum()
    if distributed.world() == 1:
        return local
    n = torch.tensor(float(len(x)), device=x.device)
    mean = distributed.all_sum(x.sum(0)) / distributed.all_sum(n)
    return distributed.all_sum(local + n * (x.mean(0) - mean).pow(2).sum())


def pairs(names: list[str]):
    return list(itertools.combinations(names, 2))


# Codes in training: TopK as (values, indices) [tokens, k] (sparse products, see sae.TopKEncode), ReLU dense.
def encode(sae: SparseAutoencoder, x: torch.Tensor):
    return sae.encode_topk(x) if sae.cfg.activation == "topk" else sae.encode(x)


def decode(sae: SparseAutoencoder, code) -> torch.Tensor:
    return sae.decode_topk(*code) if isinstance(code, tuple) else sae.decode(code)


def cosine(a, b, eps: float = 1e-8) -> torch.Tensor:
    """Per-token cosine of two codes."""
    if not isinstance(a, tuple):
        return F.cosine_similarity(a, b, dim=-1, eps=eps)
    (va, ia), (vb, ib) = a, b
    dot = (va[:, :, None] * vb[:, None, :] * (ia[:, :, None] == ib[:, None, :])).sum((1, 2))
    return dot / (va.norm(dim=-1).clamp_min(eps) * vb.norm(dim=-1).clamp_min(eps))


def losses(recipe: Recipe, saes: dict[str, SparseAutoencoder], acts: dict[str, torch.Tensor],
           fired: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The loss terms for one site; `fired` (a [d_sae] bool) is or-ed with the latents active in any source.
    With several processes, each returns its share: sums over its tokens divided by the global token count
    and variances, so the shares' gradients add up to the gradient of the global batch's loss."""
    lat = recipe.latent
    codes = {name: encode(saes[name], x) for name, x in acts.items()}
    if fired is not None:
        for z in codes.values():
            if isinstance(z, tuple):
                fired[z[1][z[0] > 0]] = True
            else:
                fired |= (z > 0).any(0)
    variance = {name: total_variance(x) for name, x in acts.items()}
    first = next(iter(acts.values()))
    tokens = distributed.all_sum(torch.tensor(float(len(first)), device=first.device))
    parts = {key: torch.zeros(()) for key in ("recon", "sparsity", "align", "cross")}
    for name, x in acts.items():
        z = codes[name][0] if isinstance(codes[name], tuple) else codes[name]
        parts["recon"] = parts["recon"] + fvu(x, decode(saes[name], codes[name]), variance[name])
        parts["sparsity"] = parts["sparsity"] + (lat.l1 * z.abs().sum() + lat.l2 * z.pow(2).sum()) / tokens
    names = list(acts)
    if lat.align > 0:
        parts["align"] = torch.stack([(1 - cosine(codes[a], codes[b])).sum() / tokens
                                      for a, b in pairs(names)]).mean()
    if lat.cross > 0:
        parts["cross"] = torch.stack([fvu(acts[b], decode(saes[b], codes[a]), variance[b])
                                      for a, b in itertools.permutations(names, 2)]).mean()
    parts["total"] = parts["recon"] + parts["sparsity"] + lat.align * parts["align"] + lat.cross * parts["cross"]
    return parts


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


class Moments:
    """Running sums for the variance of a stream of [tokens, d] batches (float64)."""

    def __init__(self):
        self.n, self.total, self.squares = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        self.n += len(x)
        self.total = self.total + x.sum(0)
        self.squares += x.pow(2).sum().item()

    def variance(self) -> float:
        return max(self.squares - (self.total.pow(2).sum().item() / self.n), 1e-12)


@torch.no_grad()
def measure(saes: dict[str, SparseAutoencoder], batches: Iterable[dict[str, torch.Tensor]]) -> dict:
    """SAE quality on held-back batches, per source and per pair of sources; batch by batch, so memory does not
    grow with the number of tokens measured."""
    names = list(saes)
    moments = {n: Moments() for n in names}
    errors, sums = defaultdict(float), defaultdict(float)  # squared errors; per-token sums of l0, cosine, Jaccard
    fired = {n: torch.zeros(saes[n].cfg.d_sae, dtype=torch.bool) for n in names}
    for acts in batches:
        codes = {n: saes[n].encode(x) for n, x in acts.items()}
        for n, z in codes.items():
            moments[n].add(acts[n])
            errors[n] += (acts[n] - saes[n].decode(z)).double().pow(2).sum().item()
            sums["l0", n] += (z > 0).sum().item()
            fired[n] |= (z > 0).any(0).cpu()
        for a, b in itertools.permutations(names, 2):
            errors[a, b] += (acts[b] - saes[b].decode(codes[a])).double().pow(2).sum().item()
            sums["cos", a, b] += F.cosine_similarity(codes[a], codes[b], dim=-1, eps=1e-8).sum().item()
            active_a, active_b = codes[a] > 0, codes[b] > 0
            union = (active_a | active_b).sum(-1).clamp_min(1)
            sums["jaccard", a, b] += ((active_a & active_b).sum(-1) / union).sum().item()
    tokens = moments[names[0]].n
    out = {"tokens": tokens, "sources": {}, "pairs": {}}
    for n in names:
        out["sources"][n] = {"explained_variance": 1 - errors[n] / moments[n].variance(),
                             "l0": sums["l0", n] / tokens, "dead_fraction": (~fired[n]).float().mean().item()}
    for a, b in itertools.permutations(names, 2):
        out["pairs"][f"{a}->{b}"] = {
            # Dec_b(Enc_a(x_a)) against x_b: how well a's code stands in for b's.
            "cross_explained_variance": 1 - errors[a, b] / moments[b].variance(),
            "code_cosine": sums["cos", a, b] / tokens,
            # The cosine can be carried by a few dense shared latents; the active-set overlap cannot.
            "active_jaccard": sums["jaccard", a, b] / tokens,
        }
    return out


def _tokens(batch: list[dict[str, torch.Tensor]]) -> int:
    return next(iter(batch[0].values())).shape[0]


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


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during training; the message says where the checkpoint is."""


class TrainingDiverged(RecipeError):
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


def new_sae(recipe: Recipe, d_in: int) -> SparseAutoencoder:
    lat = recipe.latent
    return SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=lat.size, k=lat.k, activation=lat.activation, bias=lat.bias))


def init_saes(recipe: Recipe, names: list[str], first: list, rows, generator) -> list[dict[str, SparseAutoencoder]]:
    """Fresh SAEs, one per site and source, initialised from the first batches (or started from files)."""
    saes = []
    for site in range(len(first[0])):
        saes.append({})
        for name in names:
            x = torch.cat([batch[site][name] for batch in first])
            sae = new_sae(recipe, x.shape[-1])
            if recipe.source(name).sae:
                start_from_file(sae, recipe.source(name).sae_folders[site], x)
            else:
                sae.init_random(generator)
                sae.init_from_data(x, rows)
            saes[site][name] = sae
    return saes


def train_saes(recipe: Recipe, sources: dict, paths: dict[str, list[str]], tokenizer,
               log_path: str | Path | None = None, progress: bool = True, checkpoint: str | Path | None = None,
               resume: bool = False) -> tuple[list[dict[str, SparseAutoencoder]], dict]:
    """Train the aligned SAEs on the recipe's data: per site (position in the sources' layer lists), one SAE
    per source sharing one latent space. Return them (site-major) and their final metrics.

    With `checkpoint` (a folder), the state is saved every `train.checkpoint_every` steps, on SIGINT/SIGTERM
    (then TrainingInterrupted is raised) and at the end; `resume` continues from it, and ends with the
    weights an uninterrupted run would have. The training log is then `checkpoint/training_log.jsonl`.
    With several processes (distributed.py) each trains on its share of every batch; only the first writes
    checkpoints and logs and measures the final metrics (the others return empty metrics)."""
    device = distributed.device(resolve_device(recipe.train.device))
    main = distributed.is_main()
    torch.manual_seed(recipe.train.seed)
    generator = torch.Generator().manual_seed(recipe.train.seed)
    batch_size = max(1, recipe.train.batch_tokens // recipe.data.seq_len)
    steps = max(1, math.ceil(recipe.data.tokens / (batch_size * recipe.data.seq_len)))
    checkpoint = Path(checkpoint) if checkpoint else None
    settings = checkpoint_io.training_settings(recipe)
    if checkpoint and log_path is None:
        log_path = checkpoint / "training_log.jsonl"
    if not main:
        log_path = None

    def stream(start: int):
        return activation_batches(recipe, sources, paths, tokenizer, batch_size // distributed.world(), start,
                                  distributed.rank(), distributed.world())

    # Enough first batches (of every process) to give every latent its own token when initialising from data.
    tokens_per_batch = batch_size * (recipe.data.seq_len - 1)  # position 0 is left out
    n_first = math.ceil(recipe.latent.size / tokens_per_batch) if recipe.latent.init == "data" else 1
    if resume:
        state, tensors = checkpoint_io.load(checkpoint, settings)
        start = state["step"]
        n_sites = len(next(iter(paths.values())))
        saes = [{n: new_sae(recipe, tensors[f"sae.{site}.{n}.W_enc"].shape[0]) for n in sources}
                for site in range(n_sites)]  # weights, optimizer and random states: restored below
        batches = stream(start)
    else:
        start = 0
        batches = stream(0)
        first = [next(batches) for _ in range(n_first)]
        everyone = [[{n: distributed.gather_rows(x) for n, x in site.items()} for site in b] for b in first]
        rows = torch.randperm(_tokens(everyone[0]) * len(everyone), generator=generator)[: recipe.latent.size] \
            if recipe.latent.init == "data" else None
        saes = init_saes(recipe, list(sources), everyone, rows, generator)
        batches = itertools.chain(first, batches)
    saes = [{n: group[n].to(device) for n in sources} for group in saes]
    every_sae = [sae for site in saes for sae in site.values()]
    params = [p for sae in every_sae for p in sae.parameters()]
    distributed.broadcast(params + [sae.act_scale for sae in every_sae])  # identical replicas
    optimizer = torch.optim.Adam(params, lr=recipe.train.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    fired = [torch.zeros(recipe.latent.size, dtype=torch.bool, device=device) for _ in saes]
    resampled = 0
    if resume:
        checkpoint_io.restore(state, tensors, saes, optimizer, schedule, generator, fired, recipe.train.lr)
        resampled = state["resampled_latents"]
        if state.get("metrics"):  # training had finished: nothing left to do
            return _finish(saes), state["metrics"]

    def save_checkpoint(step_done: int, **extra) -> None:
        if checkpoint and main:
            checkpoint_io.save(checkpoint, step_done, saes, optimizer, schedule, generator, fired, settings,
                               resampled_latents=resampled, **extra)

    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in Path(log_path).read_text().splitlines()
                if json.loads(line)["step"] < start] if resume and Path(log_path).is_file() else []
        Path(log_path).write_text("".join(line + "\n" for line in kept))
    log = open(log_path, "a") if log_path else None
    bar = tqdm(range(start, steps), desc="training SAEs", disable=not (progress and main), unit="step",
               initial=start, total=steps)
    last_saved = start if resume else None
    with StopRequests() as stop:
        for step in bar:
            batch = [{n: x.to(device) for n, x in acts.items()} for acts in next(batches)]
            every = recipe.train.resample_every
            if every and step % every == 0 and 0 < step < 0.8 * steps:  # leave the last fifth to settle
                for site, acts in enumerate(batch):  # on the whole batch, identically in every process
                    distributed.or_masks(fired[site])
                    everyone = {n: distributed.gather_rows(x) for n, x in acts.items()}
                    resampled += resample_dead(saes[site], everyone, ~fired[site], optimizer, generator)
                    fired[site].zero_()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.train.autocast):
                site_parts = [losses(recipe, saes[site], acts, fired[site]) for site, acts in enumerate(batch)]
            parts = {key: sum(p[key] for p in site_parts) for key in site_parts[0]}
            total = distributed.all_sum(parts["total"].detach())
            if not torch.isfinite(total):
                then = (f"continue from the last good checkpoint, '{checkpoint}' (after step {last_saved}), with "
                        "--resume (train.lr may change on resume)" if last_saved is not None else "run again")
                raise TrainingDiverged(f"train: the loss became {total.item()} at step {step}; stopped "
                                       f"before saving anything non-finite. Expected a finite loss: lower train.lr "
                                       f"and {then}")
            optimizer.zero_grad(set_to_none=True)
            parts["total"].backward()
            distributed.sum_gradients(params)
            for sae in every_sae:
                sae.remove_parallel_grads()
            optimizer.step()
            schedule.step()
            for sae in every_sae:
                sae.normalize_decoder()
            if step % recipe.train.log_every == 0 or step == steps - 1:
                row = {"step": step, "tokens": (step + 1) * batch_size * recipe.data.seq_len,
                       **{k: distributed.all_sum(v.detach()).item() for k, v in parts.items()}}
                bar.set_postfix(fvu=f"{row['recon'] / len(every_sae):.3f}", align=f"{row['align']:.3f}")
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
            every = recipe.train.checkpoint_every
            stopping = distributed.any_true(stop.signal is not None)  # every process stops at the same step
            if stopping or (every and (step + 1) % every == 0 and step + 1 < steps):
                for f in fired:
                    distributed.or_masks(f)
                save_checkpoint(step + 1)
                last_saved = step + 1
            if stopping:
                why = stop.signal or "a stop request to another process"
                raise TrainingInterrupted(f"{why} at step {step + 1} of {steps}; checkpoint in '{checkpoint}'"
                                          if checkpoint else f"{why} at step {step + 1} of {steps}")
    if log:
        log.close()
    if not main:
        return _finish(saes), {}

    # Held back: whole batches (as one process forms them) from the first shuffle block no training or
    # initialisation batch drew tokens from, unshuffled, so that no more is harvested than measured.
    block = recipe.train.shuffle_batches
    unseen = math.ceil(max(steps, n_first) / block) * block
    batches = activation_batches(recipe, sources, paths, tokenizer, batch_size, unseen, shuffle=False)
    sites = [[] for _ in saes]
    tokens = 0
    while tokens < recipe.train.eval_tokens:  # eval_tokens activations are kept; codes only batch by batch
        batch = next(batches)
        tokens += _tokens(batch)
        for site, acts in enumerate(batch):
            sites[site].append({n: x.to(device) for n, x in acts.items()})
    metrics = {"sites": [{"layers": {n: paths[n][site] for n in sources}, **measure(saes[site], sites[site])}
                         for site in range(len(saes))],
               "steps": steps, "train_tokens": steps * batch_size * recipe.data.seq_len, "resampled_latents": resampled}
    save_checkpoint(steps, metrics=metrics)  # a run stopped later (calibration, saving) resumes from here
    return _finish(saes), metrics


def _finish(saes: list[dict[str, SparseAutoencoder]]) -> list[dict[str, SparseAutoencoder]]:
    for site in saes:
        for sae in site.values():
            sae.eval()
    return saes
