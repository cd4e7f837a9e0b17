"""The library without a recipe: one SAE on one model's layer from an activation stream, an aligned pair, and a
merged model built in memory from loaded sources and SAEs."""

import itertools

import torch

from saemerge import (LatentSpec, MergeSpec, SAEMergedForCausalLM, TrainSpec, activation_batches, load_source,
                      load_tokenizer, merged_model, resolve_layer, train_saes)
from saemerge.data import token_batches
from saemerge.recipe import DataSpec, SourceSpec
from conftest import CODE, PROSE


def pieces(zoo):
    specs = {n: SourceSpec(name=n, model=str(zoo[family]), layer=1) for n, family in (("a", "gpt2"), ("b", "llama"))}
    sources = {n: load_source(spec) for n, spec in specs.items()}
    layers = {n: [resolve_layer(model, 1)] for n, model in sources.items()}
    data = DataSpec(datasets=[{"path": "json", "data_files": str(f)} for f in (PROSE, CODE)], seq_len=32)
    tokenizer = load_tokenizer(specs["a"])

    def stream(names, seed=0):
        return lambda start: activation_batches({n: sources[n] for n in names}, layers,
                                                token_batches(data, tokenizer, 8, seed), start)
    return sources, layers, stream


def test_one_sae_on_one_model_from_a_stream(zoo):
    _, _, stream = pieces(zoo)
    held_back = list(itertools.islice(stream(["a"], seed=1)(0), 4))
    saes, metrics = train_saes(stream(["a"]), LatentSpec(size=64, activation="topk", k=8), TrainSpec(device="cpu"),
                               steps=40, held_back=held_back, progress=False)
    assert [list(site) for site in saes] == [["a"]] and saes[0]["a"].cfg.d_in == 32
    site = metrics["sites"][0]
    assert site["tokens"] == 4 * 8 * 31 and site["pairs"] == {}
    assert site["sources"]["a"]["explained_variance"] > 0.5 and site["sources"]["a"]["l0"] <= 8
    assert metrics["steps"] == 40 and metrics["train_tokens"] == 40 * 8 * 31  # activations: position 0 left out


def test_an_iterable_stream_trains_as_the_restartable_one(zoo):
    """A plain iterable of batches (no resume) gives the same SAEs as a function of the start index."""
    _, _, stream = pieces(zoo)
    latent, train = LatentSpec(size=32, activation="topk", k=4), TrainSpec(device="cpu", resample_every=5)
    first, _ = train_saes(stream(["a"]), latent, train, steps=12, progress=False)
    second, _ = train_saes(list(itertools.islice(stream(["a"])(0), 12)), latent, train, steps=12, progress=False)
    for key, value in first[0]["a"].state_dict().items():
        assert torch.equal(value, second[0]["a"].state_dict()[key]), key


def test_aligned_pair_merged_in_memory_generates(zoo, tmp_path):
    sources, layers, stream = pieces(zoo)
    saes, _ = train_saes(stream(["a", "b"]), LatentSpec(size=64, activation="topk", k=8), TrainSpec(device="cpu"),
                         steps=20, progress=False)
    model = merged_model(sources, saes, layers, MergeSpec(target="b", heads="router", gates=["latent"]))
    assert isinstance(model, SAEMergedForCausalLM) and model.config.inject == ["a"]
    assert model.config.sources[0]["reference"]["model"] == str(zoo["gpt2"])
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)
    model.save_pretrained(tmp_path / "m")
    again = SAEMergedForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
