"""Activations on the fly: the token-wise shuffle, exact restarts mid-stream, and the on-disk cache."""

import pytest
import torch

from saemerge.harvest import recipe_batches, shuffled
from saemerge import validate
from saemerge.recipe import Recipe
from saemerge.sources import load_source, load_tokenizer
from saemerge.pipeline import train_from_recipe
from conftest import recipe_dict


def test_shuffle_keeps_every_token_and_its_pairing():
    batches = [[{"a": torch.arange(i * 10, i * 10 + 10).float()[:, None].repeat(1, 3),
                 "b": -torch.arange(i * 10, i * 10 + 10).float()[:, None].repeat(1, 5)}] for i in range(4)]
    out = shuffled(batches, seed=0)
    assert len(out) == 4 and all(len(b[0]["a"]) == 10 for b in out)
    a = torch.cat([b[0]["a"][:, 0] for b in out])
    assert sorted(a.tolist()) == list(range(40))  # every token once
    assert torch.equal(torch.cat([b[0]["b"][:, 0] for b in out]), -a)  # a token's activations stay together
    assert not torch.equal(a, torch.arange(40).float())  # mixed across batches
    assert torch.equal(a, torch.cat([b[0]["a"][:, 0] for b in shuffled(batches, seed=0)]))


@pytest.fixture
def pieces(zoo, tmp_path):
    def make(**overrides):
        raw = recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path / "out", data__tokens=6 * 512, train__eval_tokens=256,
                          **overrides)
        raw["train"]["shuffle_batches"] = 3
        recipe = Recipe.model_validate(raw)
        paths = validate(recipe)
        sources = {s.name: load_source(s) for s in recipe.models}
        return recipe, sources, paths, load_tokenizer(recipe.models[0])
    return make


def test_a_stream_started_mid_block_continues_the_full_one(pieces):
    recipe, sources, paths, tokenizer = pieces()
    full = recipe_batches(recipe, sources, paths, tokenizer, batch_size=4)
    expected = [next(full) for _ in range(7)][4:]
    later = recipe_batches(recipe, sources, paths, tokenizer, batch_size=4, start=4)
    for batch in expected:
        got = next(later)
        for name in ("a", "b"):
            assert torch.equal(got[0][name], batch[0][name])


def test_cached_activations_replace_the_sources(pieces, tmp_path):
    """A second run with the same sources, layers and data reads every activation from the cache: its sources
    are never called and it trains bit-equal SAEs; another layer is another cache."""
    recipe, sources, paths, tokenizer = pieces(data__cache=str(tmp_path / "cache"))
    first, _ = train_from_recipe(recipe, sources, paths, tokenizer, progress=False)
    [folder] = (tmp_path / "cache").iterdir()
    assert len(list(folder.glob("batch-*.safetensors"))) >= 6

    def refuse(module, args, kwargs):
        raise AssertionError("a source ran although its activations were cached")
    handles = [m.register_forward_pre_hook(refuse, with_kwargs=True) for m in sources.values()]
    second, _ = train_from_recipe(recipe, sources, paths, tokenizer, progress=False)
    for handle in handles:
        handle.remove()
    for name in ("a", "b"):
        for key, value in first[0][name].state_dict().items():
            assert torch.equal(value, second[0][name].state_dict()[key]), (name, key)

    recipe, sources, paths, tokenizer = pieces(data__cache=str(tmp_path / "cache"))
    recipe.models[0].layer = 0
    train_from_recipe(recipe, sources, validate(recipe), tokenizer, progress=False)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_cache_that_is_a_file_is_refused(pieces, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match=r"data.cache: '.*file' is a file; expected a folder"):
        pieces(data__cache=str(tmp_path / "file"))


def test_bf16_autocast_trains_as_well_as_float32(pieces):
    recipe, sources, paths, tokenizer = pieces()
    _, full = train_from_recipe(recipe, sources, paths, tokenizer, progress=False)
    recipe.train.autocast = True
    saes, mixed = train_from_recipe(recipe, sources, paths, tokenizer, progress=False)
    assert all(p.dtype == torch.float32 for p in saes[0]["a"].parameters())
    for name in ("a", "b"):
        ev_full = full["sites"][0]["sources"][name]["explained_variance"]
        ev_mixed = mixed["sites"][0]["sources"][name]["explained_variance"]
        assert ev_full > 0.3 and abs(ev_full - ev_mixed) < 0.03, (ev_full, ev_mixed)
