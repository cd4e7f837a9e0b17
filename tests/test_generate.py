"""generate() on merged models: each source keeps its own KV cache, and caching changes no output."""

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache

from saemerge.modeling import OUTPUT_CACHE, MergedCache
from conftest import PROMPTS


@pytest.mark.parametrize("kind", ["target", "router", "two_sites"])
def test_greedy_with_cache_equals_greedy_without(merges, batch, kind):
    model = merges[kind]
    kwargs = dict(**batch, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(**kwargs, use_cache=True)
    recomputed = model.generate(**kwargs, use_cache=False)
    assert cached.shape == (3, batch["input_ids"].shape[1] + 12)
    assert torch.equal(cached, recomputed)


def test_the_cache_holds_one_kv_cache_per_source(merges, batch):
    """Every source runs once per forward (lockstep.py), so each keeps one KV cache; in the target wiring the
    sender's is filled only up to its layer."""
    length = batch["input_ids"].shape[1]
    for kind in ("router", "target"):
        model = merges[kind]
        with torch.no_grad():
            out = model(**batch, use_cache=True)
        cache = getattr(out, OUTPUT_CACHE)
        assert isinstance(cache, MergedCache)
        assert set(cache.caches) == {"source:a", "source:b"}
        assert cache.get_seq_length() == length
        receiver, sender = (cache.caches[f"source:{n}"] for n in (model.config.target, model.config.inject[0]))
        assert receiver.get_seq_length(len(receiver.layers) - 1) == length
        if kind == "target":  # layer 1 is the last the sender needs
            assert sender.get_seq_length(1) == length and sender.get_seq_length(2) == 0
    assert getattr(model(**batch), OUTPUT_CACHE) is None  # plain forwards (lm-eval) keep no cache


def test_left_padded_batch_generates_what_each_prompt_generates_alone(merges, batch, zoo):
    tok = AutoTokenizer.from_pretrained(zoo["gpt2"])
    model = merges["target"]
    together = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    for i, prompt in enumerate(PROMPTS):
        alone = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
        assert torch.equal(together[i, -8:], alone[0, -8:]), prompt


def test_eos_stops_and_pads(merges, batch):
    model = merges["target"]
    greedy = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    start = batch["input_ids"].shape[1]
    stop = int(greedy[0, start + 1])  # the first row's second new token becomes its end of sequence
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=399, eos_token_id=stop)
    # Each row is the greedy one up to its first `stop` (included), then padding; generation ends once every row
    # has stopped (or after 6 new tokens).
    ends = [start + 1 + row.tolist().index(stop) if stop in row else greedy.shape[1] for row in greedy[:, start:]]
    expected = torch.full((len(ends), max(ends)), 399)
    for i, end in enumerate(ends):
        expected[i, :end] = greedy[i, :end]
    assert torch.equal(out, expected)  # row 0 stops early, by the choice of `stop`


def test_sampling_is_seeded_and_differs_from_greedy(merges, batch):
    model = merges["router"]
    kwargs = dict(**batch, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, pad_token_id=0,
                  eos_token_id=None)
    torch.manual_seed(3)
    first = model.generate(**kwargs)
    torch.manual_seed(3)
    again = model.generate(**kwargs)
    greedy = model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(first, again)
    assert not torch.equal(first, greedy)
    assert first.max() < model.config.vocab_size


def test_beam_search_reorders_every_source_cache(merges, batch):
    model = merges["router"]
    kwargs = dict(**batch, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(**kwargs, use_cache=True), model.generate(**kwargs, use_cache=False))


def test_the_cache_is_taken_under_either_name_and_refused_under_any_other(merges, batch):
    """`cache` (transformers >= 5.24) and `past_key_values` (before) both carry it; a cache under another name is an
    error, not a forward that silently runs without it."""
    model = merges["router"]
    prefix = {k: v[:, :-1] for k, v in batch.items()}
    with torch.no_grad():
        whole = model(**batch).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = model.new_cache()
            model(**prefix, use_cache=True, **{name: cache})
            last = model(input_ids=batch["input_ids"][:, -1:], attention_mask=batch["attention_mask"], use_cache=True,
                         **{name: cache}).logits[:, -1]
            assert torch.allclose(last, whole, atol=1e-5), name
        with pytest.raises(TypeError, match=r"got a KV cache as \['kv_cache'\]"):
            model(**batch, kv_cache=model.new_cache())
        with pytest.raises(TypeError, match="MergedCache"):
            model(**batch, cache=DynamicCache())
