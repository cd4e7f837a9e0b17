"""One text read through two tokenizers: the bytes each token spells, where both tokenizations have consumed the
same text (the pairs SAEs train on), and what another model makes of a prefix (what a merged model feeds it).

A token's bytes come from its vocabulary entry: byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen) maps characters
back to bytes, SentencePiece-style BPE (Gemma) writes a space as '▁' and a byte without a token as <0xNN>, and
special tokens (BOS, EOS, padding) spell nothing. That needs no offset mapping, so slow tokenizers work too, and
it is exact where offset mappings are not (byte-level BPE trims whitespace from them, SentencePiece's refer to
normalised text). A tokenizer whose tokens do not spell its input back (a normaliser that changes the text, a
dummy-prefix space) is refused by `spelling_problem`.

At inference a sender never reads beyond the receiver's token t: it gets the text of the receiver's tokens up to
t's end, tokenizes that prefix on its own (its last token may be part of a word: the text so far is all there
is) and gives its residual at the prefix's last token. Tokenizing the whole text once would leak the future: how
a BPE splits a word depends on the letters after it.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import torch
from transformers import DynamicCache

from .cache import cache_argument
from .hooks import run_to_layers

PROBE = "Hello, world!\n    def f(x):\n        return x ** 2  # ünïcödé 123\tend  \n\n"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the inverse of its bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder"))


class TokenBytes:
    """The bytes every token id of one tokenizer spells."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        byte_level, decoder = _byte_level(tokenizer), _byte_decoder()
        special = set(tokenizer.all_special_ids)
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.table = []
        for i, token in enumerate(tokens):
            if i in special or token is None:
                self.table.append(b"")
            elif byte_level and all(c in decoder for c in token):
                self.table.append(bytes(decoder[c] for c in token))
            elif match := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token):
                self.table.append(bytes([int(match[1], 16)]))
            else:
                self.table.append(token.replace("▁", " ").encode())

    def spell(self, ids: list[int]) -> bytes:
        return b"".join(self.table[i] for i in ids)

    def ends(self, ids: list[int]) -> list[int]:
        """The byte offset where each token ends in the text the ids spell."""
        out, end = [], 0
        for i in ids:
            end += len(self.table[i])
            out.append(end)
        return out


@lru_cache(maxsize=8)
def token_bytes(tokenizer) -> TokenBytes:
    """TokenBytes of a tokenizer object, built once (a 262k vocabulary takes seconds, and a merge asks at its check,
    its harvests and its build)."""
    return TokenBytes(tokenizer)


def spelling_problem(tokenizer, text: str = PROBE) -> str | None:
    """Why the tokens' bytes do not spell the text back (None if they do)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    spelt = token_bytes(tokenizer).spell(ids)
    if spelt != text.encode():
        return f"its tokens spell {spelt[:40]!r} for {text[:40]!r}"
    return None


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a(PROBE)["input_ids"] == b(PROBE)["input_ids"]


def adds_bos(tokenizer) -> list[int]:
    """[BOS] if the tokenizer starts a sequence with it by itself (Llama, Gemma), else []."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


class Retokenizer:
    """Text written in the `reference` tokenizer's ids, read again by `other`."""

    def __init__(self, reference, other):
        self.reference, self.other, self.other_bytes = token_bytes(reference), other, token_bytes(other)
        self.bos = adds_bos(other)

    def read(self, texts: list[bytes]) -> list[list[int]]:
        """`other`'s ids of each text (with its BOS, as it starts a sequence). A multi-byte character cut at the end
        of a text is left out: it is not read until it is whole."""
        strings = [t.decode("utf-8", errors="ignore") for t in texts]
        return [self.bos + ids for ids in self.other(strings, add_special_tokens=False)["input_ids"]]

    def pairs(self, ids: list[int]) -> tuple[list[int], list[int], list[int]]:
        """For one row of reference ids: `other`'s ids of the same text, and the positions (reference, other) where
        both tokenizations end at the same byte, so both models have read the same text. Position 0 of either is
        left out (BOS, or the first token: an attention sink), and so is text after an undecodable byte."""
        text = self.reference.spell(ids)
        other_ids = self.read([text])[0]
        decoded = text.decode("utf-8", errors="ignore").encode()
        valid = next((i for i, (a, b) in enumerate(zip(decoded, text)) if a != b), min(len(decoded), len(text)))
        first_at = {}
        for position, end in enumerate(self.other_bytes.ends(other_ids)):
            if position > 0 and 0 < end <= valid:
                first_at.setdefault(end, position)
        ours, theirs, seen = [], [], set()
        for position, end in enumerate(self.reference.ends(ids)):
            if position > 0 and end in first_at and end not in seen:
                seen.add(end)
                ours.append(position)
                theirs.append(first_at[end])
        return other_ids, ours, theirs


def _sliced(cache: DynamicCache, length: int) -> DynamicCache:
    """A new cache holding the first `length` positions of `cache` (views: the original is not changed)."""
    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        if layer.is_initialized and layer.keys.numel():
            out.update(layer.keys[..., :length, :], layer.values[..., :length, :], i)
    return out


@torch.no_grad()
def read_prefixes(model, layers: list[str], retokenizer: Retokenizer, ids: torch.Tensor,
                  attention_mask: torch.Tensor | None, new: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What `model` (which reads `retokenizer.other`'s tokens) holds at `layers` at each of the last `new` positions
    of `ids` ([batch, positions so far], the reference tokenizer's), having read the text up to that token's end:
    per layer [batch, new, d], and [batch, new] True where it has read anything (padding and a text still empty
    before the first token read nothing: zeros there).

    Per row, the longest prefix runs once with a KV cache; a shorter prefix whose tokens are a prefix of its tokens
    takes its residual from there, and one that is tokenized otherwise (a word cut at t) runs only its diverging
    tail on a slice of that cache."""
    batch, total = ids.shape
    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    out, read = None, torch.zeros(batch, new, dtype=torch.bool)
    device, argument = model.device, cache_argument(model)
    for b in range(batch):
        real = mask[b, -total:]
        row = ids[b][real].tolist()
        ends = retokenizer.reference.ends(row)
        text = retokenizer.reference.spell(row)
        count = real.cumsum(0)  # real tokens up to each column
        columns = [j for j in range(new) if real[total - new + j]]
        if not columns:
            continue
        read_to = [ends[count[total - new + j] - 1] for j in columns]
        # An empty text reads nothing, not even the sender's BOS (whose residual is an outlier, an attention sink).
        prefixes = [p if end else [] for p, end in zip(retokenizer.read([text[:end] for end in read_to]), read_to)]
        longest = max(prefixes, key=len)
        if not longest:
            continue
        cache = DynamicCache()
        main = run_to_layers(model, layers, torch.tensor([longest], device=device), use_cache=True,
                             **{argument: cache})
        for j, prefix in zip(columns, prefixes):
            if not prefix:
                continue
            shared = next((i for i, (a, c) in enumerate(zip(prefix, longest)) if a != c), len(prefix))
            if shared == len(prefix):
                states = [h[0, shared - 1] for h in main]
            else:
                tail = torch.tensor([prefix[shared:]], device=device)
                kwargs = {"use_cache": True, argument: _sliced(cache, shared)} if shared else {}
                states = [h[0, -1] for h in run_to_layers(model, layers, tail, **kwargs)]
            if out is None:
                out = [torch.zeros(batch, new, s.shape[-1], dtype=s.dtype, device=s.device) for s in states]
            for o, s in zip(out, states):
                o[b, j] = s
            read[b, j] = True
    if out is None:  # nothing read anywhere: zeros of the model's width
        width = model.config.get_text_config().hidden_size
        out = [torch.zeros(batch, new, width, dtype=model.dtype, device=device) for _ in layers]
    return out, read
