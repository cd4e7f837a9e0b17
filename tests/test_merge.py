"""Whole merges on tiny real models: the output folder, loading it back, the merge arithmetic, determinism."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import saemerge
from saemerge import SAEMergedForCausalLM, build_merged, load_source, parse_recipe, train_from_recipe, validate
from saemerge.cli import main
from conftest import recipe_dict

IDS = torch.randint(1, 300, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def merged_dir(zoo, tmp_path_factory):
    """gpt2 (width 32) injected into llama (width 48) through the CLI."""
    root = tmp_path_factory.mktemp("merge")
    path = root / "recipe.yaml"
    import yaml
    path.write_text(yaml.safe_dump(recipe_dict(zoo["gpt2"], zoo["llama"], root / "out")))
    assert main(["merge", str(path), "--quiet"]) == 0
    return root / "out"


def test_output_folder_is_complete(merged_dir):
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "metrics.json", "report.md",
            "training_log.jsonl", "training_curves.png", "saes"} <= names
    assert (merged_dir / "saes/a/transformer.h.1/sae.safetensors").is_file()
    assert (merged_dir / "saes/b/model.layers.1/cfg.json").is_file()
    metrics = json.loads((merged_dir / "metrics.json").read_text())
    site = metrics["sites"][0]
    assert site["layers"] == {"a": "transformer.h.1", "b": "model.layers.1"}
    assert set(site["sources"]["a"]) == {"explained_variance", "l0", "dead_fraction"}
    assert site["sources"]["a"]["l0"] <= 8  # topk with k = 8
    assert {"cross_explained_variance", "code_cosine", "active_jaccard"} <= set(site["pairs"]["a->b"])
    assert not list(merged_dir.parent.glob(".out*"))  # no temporary leftovers


def test_loads_with_auto_class_and_runs_offline(merged_dir):
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert isinstance(model, SAEMergedForCausalLM)
    assert model.config.target == "b" and model.config.inject == ["a"]
    out = model(IDS, labels=IDS)
    assert out.logits.shape == (2, 16, 400) and torch.isfinite(out.loss)
    # The GPT-2 source ties its head to its embeddings; that must survive the round trip.
    gpt2 = model.sources["a"]
    assert gpt2.lm_head.weight.data_ptr() == gpt2.transformer.wte.weight.data_ptr()


def merged_in_memory(zoo, tmp_path, **overrides):
    recipe = parse_recipe(recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path / "out", **overrides))
    paths = validate(recipe)
    tok = AutoTokenizer.from_pretrained(zoo["gpt2"])
    sources = {s.name: load_source(s) for s in recipe.models}
    saes, metrics = train_from_recipe(recipe, sources, paths, tok, progress=False)
    return recipe, build_merged(recipe, sources, saes, paths), saes, metrics


def test_cli_output_equals_the_in_memory_model(zoo, tmp_path, merged_dir):
    """The folder `saemerge merge` wrote loads back with exactly the logits of the same recipe built in memory."""
    _, model, _, _ = merged_in_memory(zoo, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_scale_zero_is_the_target_alone_and_scale_one_is_not(zoo, tmp_path, combine):
    _, model, _, _ = merged_in_memory(zoo, tmp_path, merge__combine=combine)
    with torch.no_grad():
        target = model.sources["b"](IDS).logits
        merged = model(IDS).logits
        model.config.scale = 0.0
        silent = model(IDS).logits
    assert torch.equal(silent, target)
    assert not torch.allclose(merged, target)


def test_mean_combine_arithmetic(zoo, tmp_path):
    """mean: h_T + (Dec_T(z_A) - Dec_T(z_T)) / 2 at the target's layer, checked against the SAE by hand."""
    _, model, saes, _ = merged_in_memory(zoo, tmp_path)
    h_a = saemerge.run_to_layer(model.sources["a"], 1, IDS)
    h_b = saemerge.run_to_layer(model.sources["b"], 1, IDS)
    sae_a, sae_b = saes[0]["a"], saes[0]["b"]
    z_a, z_b = sae_a.encode(h_a), sae_b.encode(h_b)
    expected = h_b + 0.5 * ((sae_b.decode(z_a) - sae_b.b_dec * sae_b.act_scale)
                            - (sae_b.decode(z_b) - sae_b.b_dec * sae_b.act_scale))
    torch.testing.assert_close(h_b + model.bridge.receive("b", 0, h_b, {"a": z_a}), expected, rtol=1e-5, atol=1e-5)


def test_training_is_deterministic_for_a_seed(zoo, tmp_path):
    _, _, saes_1, metrics_1 = merged_in_memory(zoo, tmp_path)
    _, _, saes_2, metrics_2 = merged_in_memory(zoo, tmp_path)
    for name in saes_1[0]:
        for key, tensor in saes_1[0][name].state_dict().items():
            assert torch.equal(tensor, saes_2[0][name].state_dict()[key]), (name, key)
    assert metrics_1 == metrics_2
    _, _, saes_3, _ = merged_in_memory(zoo, tmp_path, train__seed=1)
    assert not torch.equal(saes_1[0]["a"].W_enc, saes_3[0]["a"].W_enc)


def test_alignment_term_aligns_codes(zoo, tmp_path):
    """Same budget, align on vs off: the codes the two models give the same token agree more with it on."""
    on = merged_in_memory(zoo, tmp_path, latent__align=5.0, data__tokens=8192)[3]
    off = merged_in_memory(zoo, tmp_path, latent__align=0.0, latent__cross=0.0, data__tokens=8192)[3]
    assert on["sites"][0]["pairs"]["a->b"]["code_cosine"] > off["sites"][0]["pairs"]["a->b"]["code_cosine"] + 0.05


def test_generate_greedy_matches_argmax_loop(merged_dir):
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    prompt = IDS[:1, :5]
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_any_family_can_be_a_target(zoo, tmp_path):
    """GPT-NeoX into Gemma 3 and Gemma 3 into GPT-2: the hooks and the merged forward do not depend on a family.
    (transformers loads a Qwen2 folder's tokenizer as Qwen2Tokenizer, which pre-tokenizes differently, so the
    tokenizer check rightly refuses to pair it with the others.)"""
    for a, b in [("gpt_neox", "gemma3_text"), ("gemma3_text", "gpt2")]:
        raw = recipe_dict(zoo[a], zoo[b], tmp_path / f"{a}-{b}", data__tokens=1024)
        recipe = parse_recipe(raw)
        paths = validate(recipe)
        sources = {s.name: load_source(s) for s in recipe.models}
        saes, _ = train_from_recipe(recipe, sources, paths, AutoTokenizer.from_pretrained(zoo[a]), progress=False)
        model = build_merged(recipe, sources, saes, paths)
        with torch.no_grad():
            merged = model(IDS).logits
            model.config.scale = 0.0
            alone = model(IDS).logits
            target = model.sources["b"](IDS).logits
        # The injection reaches the target's residual stream (and nothing else does: scale 0 is the target).
        assert torch.isfinite(merged).all() and not torch.allclose(merged, alone), (a, b)
        assert torch.equal(alone, target), (a, b)


def test_heads_mean_without_exchange_is_the_logit_ensemble(zoo, tmp_path):
    _, model, _, _ = merged_in_memory(zoo, tmp_path, merge__heads="mean", merge__scale=0.0)
    with torch.no_grad():
        probs = [model.sources[n](IDS).logits.softmax(-1) for n in ("a", "b")]
        torch.testing.assert_close(model(IDS).logits.softmax(-1), (probs[0] + probs[1]) / 2)


def test_router_starts_uniform_and_exchange_changes_both_heads(zoo, tmp_path):
    _, routed, _, _ = merged_in_memory(zoo, tmp_path, merge__heads="router")
    _, mean, _, _ = merged_in_memory(zoo, tmp_path, merge__heads="mean")
    _, ensemble, _, _ = merged_in_memory(zoo, tmp_path, merge__heads="mean", merge__scale=0.0)
    with torch.no_grad():
        torch.testing.assert_close(routed(IDS).logits, mean(IDS).logits)
        assert not torch.allclose(mean(IDS).logits, ensemble(IDS).logits)


def test_calibration_trains_only_gates_and_router_and_lowers_the_loss(zoo, tmp_path, write_recipe):
    """A briefly trained GPT-2 beside a random Llama: the router must learn to trust the trained head."""
    raw = recipe_dict(zoo["gpt2_trained"], zoo["llama"], tmp_path / "out", merge__heads="router",
                      merge__gates=["latent", "token"], merge__calibrate={"steps": 30, "lr": 0.05, "batch_tokens": 256})
    assert main(["merge", str(write_recipe(raw)), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())["calibration"]
    assert metrics["held_back_loss_after"] < metrics["held_back_loss_before"] - 0.1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.router.weight.abs().sum() > 0 and model.latent_gates[0]["a"].abs().sum() > 0
    assert set(model.token_gates[0]) == {"a", "b"}
    # Sources and SAEs are untouched by calibration.
    source = AutoModelForCausalLM.from_pretrained(zoo["gpt2_trained"])
    assert torch.equal(model.sources["a"].transformer.h[2].mlp.c_fc.weight, source.transformer.h[2].mlp.c_fc.weight)


def test_several_layers_per_source(zoo, tmp_path, write_recipe):
    """layer: [0, 2] gives two sites, each with its own shared latent space, gates and injection hook."""
    raw = recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path / "out", data__tokens=1024, merge__gates=["latent"])
    raw["models"][0]["layer"] = [0, 2]
    raw["models"][1]["layer"] = [0, "model.layers.2"]
    assert main(["merge", str(write_recipe(raw)), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert [s["layers"] for s in metrics["sites"]] == [{"a": "transformer.h.0", "b": "model.layers.0"},
                                                       {"a": "transformer.h.2", "b": "model.layers.2"}]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.saes) == 2 and len(model.latent_gates) == 2
    with torch.no_grad():
        merged = model(IDS).logits
        # Each site injects: silencing one site's SAE path (gate 0 = logit -inf) changes the output.
        model.latent_gates[0]["b"].fill_(-1e4)
        one_site = model(IDS).logits
        model.config.scale = 0.0
        alone = model(IDS).logits
    assert not torch.allclose(merged, one_site) and not torch.allclose(one_site, alone)
    assert torch.equal(alone, model.sources["b"](IDS).logits)
    raw["models"][1]["layer"] = [1]
    assert main(["validate", str(write_recipe(raw))]) == 2
