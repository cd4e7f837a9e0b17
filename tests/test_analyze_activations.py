"""`saemerge analyze` activation measures, on the zoo models (prose, code) with small aligned SAEs trained here
through saemerge's own API, real text and real files in tmp_path."""

import json

import numpy as np
import pytest
import torch

from saemerge import (LatentSpec, SAEConfig, SparseAutoencoder, TrainSpec, activation_batches, compare_activations,
                      load_source, load_tokenizer, run_to_layer)
from saemerge.cli import main
from saemerge.data import token_batches
from saemerge.recipe import DataSpec, SourceSpec, load_recipe, recipe_yaml
from saemerge.train import train_saes

from conftest import REPO, make_model, train_tokenizer

PROSE_DATA = REPO / "eval/data/prose/validation.jsonl.gz"
LAYER = "transformer.h.1"


@pytest.fixture(scope="module")
def zoo():
    """The two zoo models, their tokenizer, 2 batches of 8 x 64 tokens of prose, and aligned SAEs (128 latents,
    TopK 8) trained for 40 steps on both models."""
    torch.manual_seed(0)
    specs = {n: SourceSpec(name=n, model=str(REPO / "eval/zoo" / n), layer=1) for n in ("prose", "code")}
    models = {n: load_source(s) for n, s in specs.items()}
    tokenizer = load_tokenizer(specs["prose"])
    data = DataSpec(datasets=[{"path": "json", "data_files": str(PROSE_DATA)}], seq_len=64)
    stream = lambda start: activation_batches(models, {n: [LAYER] for n in models},
                                              token_batches(data, tokenizer, 8, seed=1), start)
    saes, _ = train_saes(stream, LatentSpec(size=128, k=8), TrainSpec(lr=3e-3), steps=40, progress=False)
    tokens = token_batches(data, tokenizer, 8, seed=2)
    return {"models": models, "tokenizer": tokenizer, "saes": saes[0], "batches": [next(tokens), next(tokens)]}


def permuted(sae: SparseAutoencoder, seed: int = 0) -> tuple[SparseAutoencoder, torch.Tensor]:
    """The same SAE with its latents in another order: latent j of the copy is latent perm[j] of `sae`."""
    perm = torch.randperm(sae.cfg.d_sae, generator=torch.Generator().manual_seed(seed))
    copy = SparseAutoencoder(SAEConfig(**vars(sae.cfg)))
    state = sae.state_dict()
    copy.load_state_dict({**state, "W_enc": state["W_enc"][:, perm], "b_enc": state["b_enc"][perm],
                          "W_dec": state["W_dec"][perm]})
    return copy, perm


def test_an_sae_against_itself(zoo):
    model, sae = zoo["models"]["prose"], zoo["saes"]["prose"]
    r = compare_activations(model, model, 1, LAYER, sae, sae, zoo["batches"], aligned=True, map_steps=300,
                            progress=False)
    # Firing rates as a direct count: residual at block 1, position 0 left out, code > 0.
    with torch.no_grad():
        x = torch.cat([run_to_layer(model, 1, ids)[:, 1:].reshape(-1, 256) for ids in zoo["batches"]])
        direct = (sae.encode(x) > 0).double().mean(0).numpy()
    rates = r["per_latent"]["rate_a"]
    assert r["tokens"] == len(x) == 2 * 8 * 63
    np.testing.assert_allclose(rates, direct, atol=1e-12)
    np.testing.assert_array_equal(r["per_latent"]["rate_b"], rates)
    fired = (direct > 0).mean()
    assert 0.3 < fired < 1  # some latents fire, and the shares below are not trivially 0 or 1
    f = r["firing"]
    assert f["shared"] == pytest.approx(fired) and f["a_only"] == f["b_only"] == 0
    assert f["dead_in_both"] == pytest.approx(1 - fired)
    assert r["cofiring"]["mean_jaccard"] == pytest.approx(1.0) and r["cofiring"]["fired"] == int((direct > 0).sum())
    m = r["matching"]
    assert m["same_index"] == 1.0 and m["pairs"] == m["live_a"] == m["live_b"] > 10
    assert m["mmc_a_to_b"] == pytest.approx(1.0) and m["above"]["0.9"] == 1.0
    for key in ("a->b", "b->a"):
        c = r["cross"][key]
        assert c["ce_cross"] == pytest.approx(c["ce_own"], abs=1e-5)
        assert c["explained_variance"] == pytest.approx(c["own_explained_variance"], abs=1e-6)
        assert c["ce_clean"] < c["ce_own"] < c["ce_mean"]  # the own SAE costs something, the mean much more
        assert 0 < c["own_ce_recovered"] < 1
    lm = r["latent_map"]
    assert lm["fit"] > 0.9 and lm["diagonal"] > 0.6 and lm["diagonal_nonzero"] > 0.8  # from 800 tokens
    assert lm["nonzeros_per_row"] < 3
    assert lm["fixed_map_fit"] == pytest.approx(1.0)


def test_activation_matching_recovers_a_permutation(zoo):
    model, sae = zoo["models"]["prose"], zoo["saes"]["prose"]
    copy, perm = permuted(sae)
    r = compare_activations(model, model, 1, 1, sae, copy, zoo["batches"], aligned=False, map_steps=50,
                            min_fires=3, progress=False)
    pl = r["per_latent"]
    assert len(pl["act_match_a"]) == r["matching"]["live_a"] > 10
    np.testing.assert_array_equal(perm.numpy()[pl["act_match_b"]], pl["act_match_a"])  # B's j paired with A's perm[j]
    assert r["matching"]["above"]["0.9"] == 1.0
    assert r["cofiring"]["mean_jaccard"] == pytest.approx(1.0)
    # Latents firing fewer than min_fires times are left unmatched, so their share of the code is dropped.
    assert r["cross"]["a->b"]["ce_cross"] == pytest.approx(r["cross"]["a->b"]["ce_own"], abs=3e-3)
    assert r["cross"]["a->b"]["ce_recovered"] > r["cross"]["a->b"]["own_ce_recovered"] - 0.01
    # The same SAEs called aligned: latent i of one is not latent i of the other.
    aligned = compare_activations(model, model, 1, 1, sae, copy, zoo["batches"], aligned=True, map_steps=50,
                                  progress=False)
    assert aligned["cofiring"]["mean_jaccard"] < 0.3
    assert aligned["cross"]["a->b"]["ce_recovered"] < aligned["cross"]["a->b"]["own_ce_recovered"] - 0.2


def test_cli_on_a_merged_folder_and_on_sae_folders(zoo, tmp_path, capsys):
    merged = tmp_path / "merged"
    recipe = load_recipe(REPO / "recipes/quickstart.yaml")
    recipe = recipe.model_copy(update={
        "models": [s.model_copy(update={"model": str(REPO / "eval/zoo" / s.name)}) for s in recipe.models],
        "data": DataSpec(datasets=[{"path": "json", "data_files": str(PROSE_DATA)}], seq_len=64)})
    merged.mkdir()
    (merged / "recipe.yaml").write_text(recipe_yaml(recipe))
    for name, sae in zoo["saes"].items():
        sae.save(merged / "saes" / name / LAYER)
    out = tmp_path / "analysis"
    assert main(["analyze", str(merged), "--activations", "--tokens", "600", "--output", str(out), "--quiet"]) == 0
    report = json.loads((out / "analysis.json").read_text())
    acts = report["comparisons"][0]["activations"]
    assert acts["tokens"] == 630 and acts["seq_len"] == 64 and "shared" in acts["firing"]
    assert {"ce_recovered", "explained_variance"} <= set(acts["cross"]["a->b"])
    assert "- cross-reconstruction" in (out / "analysis.md").read_text()
    for name in ("firing_rate", "activation_matching", "cofiring", "cross", "latent_map"):
        assert (out / f"{name}.png").stat().st_size > 5000
    capsys.readouterr()

    # Two SAE folders outside a merged folder: models and layers given, data a file.
    a, b = tmp_path / "a", tmp_path / "b"
    zoo["saes"]["prose"].save(a)
    permuted(zoo["saes"]["prose"])[0].save(b)
    prose = str(REPO / "eval/zoo/prose")
    args = ["analyze", str(a), str(b), "--data", str(PROSE_DATA), "--tokens", "300", "--seq-len", "64", "--quiet",
            "--model-a", prose, "--layer-a", "1", "--layer-b", LAYER]
    assert main(args + ["--model-b", prose, "--output", str(tmp_path / "pair")]) == 0
    report = json.loads((tmp_path / "pair" / "analysis.json").read_text())
    assert report["comparisons"][0]["activations"]["matching"]["above"]["0.9"] == 1.0


def test_bad_input_is_one_line_and_exit_2(zoo, tmp_path, capsys):
    a = tmp_path / "a"
    zoo["saes"]["prose"].save(a)
    prose = str(REPO / "eval/zoo/prose")
    base = ["analyze", str(a), str(a), "--tokens", "100", "--quiet", "--model-a", prose, "--layer-a", "1",
            "--layer-b", "1"]

    def refused(args, *words):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err

    refused(base + ["--data", str(PROSE_DATA)], "--model-b", "missing")
    refused(base + ["--model-b", prose, "--data", str(tmp_path / "nope.jsonl")], "--data", "does not exist")
    refused(base + ["--model-b", prose, "--data", str(PROSE_DATA), "--tokens", "0"], "--tokens")
    wide = tmp_path / "wide"
    SparseAutoencoder(SAEConfig(d_in=576, d_sae=64, activation="topk", k=8)).save(wide)
    other = tmp_path / "other_tokenizer"  # a tiny GPT-2 with a tokenizer of its own
    make_model("gpt2", 300).save_pretrained(other)
    train_tokenizer(300).save_pretrained(other)
    refused(["analyze", str(a), str(wide), "--data", str(PROSE_DATA), "--tokens", "100", "--quiet", "--model-a",
             prose, "--layer-a", "1", "--layer-b", "1", "--model-b", str(other)],
            "--model-b", "tokenizer")
