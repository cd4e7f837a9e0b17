"""What the feature analyses (evolution, clusters, splitting, subsets) read besides decoder weights: a sample of a
dictionaries folder's activations, which latents fire on it, and their top-activating snippets.

Dead latents are left out of every decoder comparison: a latent that never fires keeps the decoder row it started
from (a token's activation, from the initialisation or a resampling), and such rows at two sites match each other
because the residual stream carries that token, not because a feature persists.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .dictionaries import Dictionaries
from .errors import UserError
from .sae import SparseAutoencoder

TOKENS = 16384
BATCH_TOKENS = 2048  # tokens per forward pass
CHUNK = 2 ** 24  # codes encoded at once (tokens x d_sae)


@dataclass
class Sample:
    ids: torch.Tensor  # [sequences, seq_len]
    acts: dict[int, torch.Tensor]  # site index -> [tokens, d] (position 0 left out, as in training)
    tokenizer: object


@torch.no_grad()
def sample_activations(dicts: Dictionaries, sites: list[int], tokens: int = TOKENS, data=None,
                       progress: bool = True) -> Sample:
    """Activations of `dicts`' model at `sites` on `tokens` tokens of `data`: a JSON lines file, a DataSpec, or
    None for the folder's recipe data drawn with the seed after the training one (other documents first, though
    from the same files: pass held-out text for held-out numbers)."""
    from tqdm.auto import tqdm

    from .browser import _data_spec
    from .data import token_batches
    from .harvest import activations
    from .sources import load_source, load_tokenizer

    if not isinstance(tokens, int) or tokens < 1:
        raise UserError(f"--tokens: {tokens}; expected a positive number of tokens")
    spec = data if hasattr(data, "seq_len") else _data_spec(dicts.recipe, data)
    model, tokenizer = load_source(dicts.spec).eval(), load_tokenizer(dicts.spec)
    paths = [dicts.paths[s] for s in sites]
    batches = token_batches(spec, tokenizer, max(1, BATCH_TOKENS // spec.seq_len), dicts.recipe.train.seed + 1)
    ids, acts, done = [], [[] for _ in sites], 0
    with tqdm(total=tokens, desc="features: activations", unit="tok", disable=not progress) as bar:
        while done < tokens:
            batch = next(batches)
            for site, x in zip(acts, activations({"m": model}, {"m": paths}, batch)):
                site.append(x["m"])
            ids.append(batch)
            done += batch.shape[0] * (batch.shape[1] - 1)
            bar.update(batch.shape[0] * (batch.shape[1] - 1))
    return Sample(torch.cat(ids), {s: torch.cat(a) for s, a in zip(sites, acts)}, tokenizer)


@torch.no_grad()
def encode(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Dense codes [tokens, d_sae], a chunk of rows at a time."""
    rows = max(1, CHUNK // sae.cfg.d_sae)
    return torch.cat([sae.encode(x[i:i + rows]).float() for i in range(0, len(x), rows)])


@torch.no_grad()
def fire_counts(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Tokens of `x` on which each latent fires [d_sae]."""
    rows = max(1, CHUNK // sae.cfg.d_sae)
    return sum((sae.encode(x[i:i + rows]) > 0).sum(0) for i in range(0, len(x), rows))


def live_part(sae: SparseAutoencoder, keep: torch.Tensor) -> SparseAutoencoder:
    """The SAE restricted to the latents `keep` (a bool mask [d_sae]), in their order."""
    part = SparseAutoencoder(replace(sae.cfg, d_sae=int(keep.sum())))
    with torch.no_grad():
        part.W_dec.copy_(sae.W_dec[keep])
        part.W_enc.copy_(sae.W_enc[:, keep])
        part.b_enc.copy_(sae.b_enc[keep])
        part.b_dec.copy_(sae.b_dec)
        part.act_scale.copy_(sae.act_scale)
    return part.eval()


def snippet(sample: Sample, row: int, before: int = 8, after: int = 2) -> str:
    """The token at `row` of the flattened sample (position 0 left out) in [[ ]], with its context, on one line."""
    seq_len = sample.ids.shape[1]
    seq, pos = divmod(int(row), seq_len - 1)
    pos += 1
    ids = sample.ids[seq].tolist()
    text = [sample.tokenizer.decode(part) for part in
            (ids[max(0, pos - before):pos], ids[pos:pos + 1], ids[pos + 1:pos + 1 + after])]
    line = f"{text[0]}[[{text[1]}]]{text[2]}"
    return line.replace("\n", "⏎").replace("|", "¦")  # one line, and no table cell break in markdown


def top_snippets(sample: Sample, codes: torch.Tensor, latent: int, n: int = 2) -> list[str]:
    """The snippets of `latent`'s `n` highest activations in `codes` [tokens, d_sae] (only where it fires; a
    snippet that repeats, from a document drawn twice, is shown once)."""
    values, rows = codes[:, latent].topk(min(4 * n, len(codes)))
    shown = dict.fromkeys(snippet(sample, r) for v, r in zip(values.tolist(), rows.tolist()) if v > 0)
    return list(shown)[:n]


def site_index(dicts: Dictionaries, value: int | str, arg: str = "--site") -> int:
    """A site given by its index or module path."""
    if isinstance(value, int) or str(value).lstrip("-").isdigit():
        i = int(value)
        if -len(dicts.paths) <= i < len(dicts.paths):
            return i % len(dicts.paths)
    elif value in dicts.paths:
        return dicts.paths.index(value)
    raise UserError(f"{arg}: '{value}' is not a site of {dicts.folder}; expected an index or one of {dicts.paths}")


def load(folder: str | Path, arg: str, source: str | None = None) -> Dictionaries:
    """load_dictionaries, with a missing or wrong folder a one-line error naming `arg`."""
    from .dictionaries import load_dictionaries
    from .errors import RecipeError

    if not Path(folder).is_dir():
        raise UserError(f"{arg}: '{folder}' is not a folder; expected one written by `saemerge train-saes`")
    try:
        return load_dictionaries(folder, source)
    except RecipeError as e:
        raise UserError(e.lines[0] if e.lines[0].startswith("--source") else f"{arg}: {e.lines[0]}") from None
