"""SAE interchange: our SAEs written as SAELens and sparsify files and read back, checked with the real libraries
(sae-lens, eai-sparsify) on real files in tmp_path; the CLI on a real merged folder; a recipe starting from files."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from saemerge import RecipeError, SAEConfig, SparseAutoencoder, parse_recipe, validate
from saemerge.cli import main
from saemerge.interchange import export_sae, import_sae
from conftest import recipe_dict

X = torch.randn(256, 32, generator=torch.Generator().manual_seed(0)) * 5 + 1  # raw activations, far from unit scale


def trained_like(activation: str, d_in: int = 32, seed: int = 0) -> SparseAutoencoder:
    """An SAE as training leaves one: an input scale that is not 1, biases, unit-norm decoder rows."""
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=64, activation=activation, k=8))
    with torch.no_grad():
        sae.init_random(g)
        sae.act_scale.fill_(3.7)
        sae.b_enc.copy_(torch.randn(64, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
    return sae


def assert_same_sae(recon, codes, ref_recon, ref_codes):
    assert ((recon - ref_recon).norm() / ref_recon.norm()).item() < 1e-5
    assert torch.equal(codes > 0, ref_codes > 0)


SHAPES = {"saelens": ("sae_weights.safetensors", {"W_enc": (32, 64), "b_enc": (64,), "W_dec": (64, 32), "b_dec": (32,)}),
          "sparsify": ("sae.safetensors", {"encoder.weight": (64, 32), "encoder.bias": (64,), "W_dec": (64, 32),
                                           "b_dec": (32,)})}


@pytest.mark.parametrize("activation,fmt", [("relu", "saelens"), ("topk", "saelens"), ("topk", "sparsify")])
def test_ours_to_file_to_ours(tmp_path, activation, fmt):
    sae = trained_like(activation)
    export_sae(sae, tmp_path, fmt, hook_name="transformer.h.1", model_name="eval/zoo/prose", context_size=128)
    weights, shapes = SHAPES[fmt]
    assert {k: tuple(v.shape) for k, v in load_file(tmp_path / weights).items()} == shapes
    back = import_sae(tmp_path)
    assert back.act_scale.item() == 1.0 and back.cfg.activation == activation
    with torch.no_grad():
        assert_same_sae(back(X), back.encode(X), sae(X), sae.encode(X))


def test_saelens_loads_our_files(tmp_path):
    from sae_lens import SAE, StandardSAE, TopKSAE

    for activation, cls in [("relu", StandardSAE), ("topk", TopKSAE)]:
        sae = trained_like(activation)
        export_sae(sae, tmp_path / activation, "saelens", hook_name="transformer.h.1", model_name="m", context_size=128)
        theirs = SAE.load_from_disk(tmp_path / activation)
        assert type(theirs) is cls and theirs.cfg.metadata.hook_name == "transformer.h.1"
        assert (theirs.cfg.metadata.model_name, theirs.cfg.metadata.context_size) == ("m", 128)
        with torch.no_grad():
            assert_same_sae(theirs(X), theirs.encode(X), sae(X), sae.encode(X))


def test_sparsify_loads_our_files(tmp_path):
    from sparsify import SparseCoder

    sae = trained_like("topk")
    export_sae(sae, tmp_path, "sparsify")
    theirs = SparseCoder.load_from_disk(tmp_path)
    assert (theirs.d_in, theirs.num_latents, theirs.cfg.k) == (32, 64, 8)
    with torch.no_grad():
        out = theirs(X)
        ours = sae.encode(X)
    assert_same_sae(out.sae_out, torch.zeros_like(ours).scatter(-1, out.latent_indices, out.latent_acts),
                    sae(X), ours)


def randomize(module, seed=1):
    """Non-zero biases and decoder rows of uneven norm, as a real file has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_saelens_file_to_ours_to_file_is_bit_exact(tmp_path, architecture):
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    theirs = (StandardSAE(StandardSAEConfig(d_in=32, d_sae=64)) if architecture == "standard"
              else TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=8)))
    randomize(theirs)
    theirs.save_model(tmp_path / "theirs")
    ours = import_sae(tmp_path / "theirs")
    with torch.no_grad():
        assert_same_sae(ours(X), ours.encode(X), theirs(X), theirs.encode(X))
    export_sae(ours, tmp_path / "again", "saelens")
    before, after = load_file(tmp_path / "theirs/sae_weights.safetensors"), load_file(tmp_path / "again/sae_weights.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_saelens_topk_ranked_by_decoder_norm_imports_exactly(tmp_path):
    """rescale_acts_by_decoder_norm (SAELens' TopK training default) is folded into the weights on import."""
    from sae_lens import TopKSAE, TopKSAEConfig

    theirs = TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=8, rescale_acts_by_decoder_norm=True))
    randomize(theirs)
    theirs.save_model(tmp_path)
    ours = import_sae(tmp_path)
    with torch.no_grad():
        assert_same_sae(ours(X), ours.encode(X), theirs(X), theirs.encode(X))


def test_sparsify_file_to_ours_to_file_is_bit_exact(tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    theirs = SparseCoder(32, SparseCoderConfig(num_latents=64, k=8))
    randomize(theirs)
    theirs.save_to_disk(tmp_path / "theirs")
    ours = import_sae(tmp_path / "theirs")
    with torch.no_grad():
        out = theirs(X)
        assert ((ours(X) - out.sae_out).norm() / out.sae_out.norm()).item() < 1e-5
        assert torch.equal(ours.encode(X).topk(8).indices.sort().values, out.latent_indices.sort().values)
    export_sae(ours, tmp_path / "again", "sparsify")
    before, after = load_file(tmp_path / "theirs/sae.safetensors"), load_file(tmp_path / "again/sae.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_relu_to_sparsify_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sparsify holds TopK SAEs only; this SAE's activation is relu"):
        export_sae(trained_like("relu"), tmp_path / "x", "sparsify")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="not an SAE folder"):
        import_sae(tmp_path)


@pytest.fixture(scope="module")
def merged(zoo, tmp_path_factory):
    """A real merged folder (gpt2 width 32 into llama width 48, TopK k 8, 64 latents) and its SAEs exported
    with the CLI: SAELens files in lens/, sparsify files in sparse/."""
    root = tmp_path_factory.mktemp("interchange")
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict(zoo["gpt2"], zoo["llama"], root / "out",
                                                                 data__tokens=1024)))
    assert main(["merge", str(root / "recipe.yaml"), "--quiet"]) == 0
    assert main(["export-saes", str(root / "out"), str(root / "lens")]) == 0
    assert main(["export-saes", str(root / "out"), str(root / "sparse"), "--format", "sparsify"]) == 0
    return root


def test_export_saes_command_writes_every_sae(merged, zoo):
    from sae_lens import SAE
    from sparsify import SparseCoder

    out = merged / "out"
    cfg = json.loads((merged / "lens/a/transformer.h.1/cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8 and cfg["metadata"]["model_name"] == str(zoo["gpt2"])
    assert cfg["metadata"]["context_size"] == 32
    coders = SparseCoder.load_many(str(merged / "sparse/b"), local=True)  # sparsify's <hookpoint>/ layout
    assert list(coders) == ["model.layers.1"]
    for source, hook, width in [("a", "transformer.h.1", 32), ("b", "model.layers.1", 48)]:
        ours = SparseAutoencoder.load(out / "saes" / source / hook)
        lens = SAE.load_from_disk(merged / "lens" / source / hook)
        assert lens.cfg.metadata.hook_name == hook
        x = torch.randn(64, width, generator=torch.Generator().manual_seed(2)) * 3
        with torch.no_grad():
            assert_same_sae(lens(x), lens.encode(x), ours(x), ours.encode(x))
            sparse = import_sae(merged / "sparse" / source / hook)
            assert_same_sae(sparse(x), sparse.encode(x), ours(x), ours.encode(x))


def test_export_saes_bad_input_is_one_line_and_exit_2(merged, tmp_path, capsys):
    assert main(["export-saes", str(tmp_path), str(tmp_path / "o")]) == 2
    assert main(["export-saes", str(merged / "out"), str(tmp_path / "o"), "--format", "onnx"]) == 2
    relu = tmp_path / "relu"
    trained_like("relu").save(relu / "saes/a/transformer.h.1")
    assert main(["export-saes", str(relu), str(tmp_path / "o"), "--format", "sparsify"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert "not a merged model folder" in lines[0] and "--format: 'onnx'" in lines[1] and "relu" in lines[2]
    assert not (tmp_path / "o").exists()


def test_recipe_starts_from_saelens_and_sparsify_files(merged, zoo, tmp_path, write_recipe):
    """One step at a tiny learning rate: the trained SAEs are still the SAEs of the files (source a from SAELens,
    b from sparsify), with unit decoder rows and the data's input scale."""
    files = {"a": merged / "lens/a/transformer.h.1", "b": merged / "sparse/b/model.layers.1"}
    raw = recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path / "out", data__tokens=512, train__lr=1e-8)
    raw["models"][0]["sae"] = str(files["a"])
    raw["models"][1]["sae"] = [str(files["b"])]
    assert main(["merge", str(write_recipe(raw)), "--quiet"]) == 0
    for source, hook, width in [("a", "transformer.h.1", 32), ("b", "model.layers.1", 48)]:
        trained, start = SparseAutoencoder.load(tmp_path / "out/saes" / source / hook), import_sae(files[source])
        x = torch.randn(64, width, generator=torch.Generator().manual_seed(3)) * 3
        with torch.no_grad():
            assert ((trained(x) - start(x)).norm() / start(x).norm()).item() < 1e-4
            assert torch.equal(trained.encode(x) > 0, start.encode(x) > 0)
        torch.testing.assert_close(trained.W_dec, start.W_dec / start.W_dec.norm(dim=-1, keepdim=True), atol=1e-5, rtol=0)
        assert trained.act_scale.item() != 1.0


def test_recipe_sae_checks_name_the_field(merged, zoo, tmp_path):
    lens_a, sparse_b = str(merged / "lens/a/transformer.h.1"), str(merged / "sparse/b/model.layers.1")
    raw = recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path / "out")
    raw["models"][0]["sae"] = [lens_a, lens_a]
    with pytest.raises(RecipeError, match=r"models\.0\.sae: 2 given; expected one folder per layer \(1\)"):
        parse_recipe(raw)
    raw["models"][0]["sae"] = sparse_b                      # an SAE of the other model (width 48)
    raw["models"][1]["sae"] = [str(tmp_path / "missing")]
    with pytest.raises(RecipeError) as e:
        validate(parse_recipe(raw))
    assert e.value.lines == [
        f"models.0.sae: '{sparse_b}' reads 48 features; expected 32, the width of transformer.h.1 in '{zoo['gpt2']}'",
        f"models.1.sae.0: folder '{tmp_path / 'missing'}' does not exist"]
    raw["models"][0]["sae"], raw["models"][1]["sae"] = lens_a, None
    raw["latent"] |= {"size": 128, "activation": "relu"}
    with pytest.raises(RecipeError) as e:
        validate(parse_recipe(raw))
    assert e.value.lines == [f"models.0.sae: '{lens_a}' has 64 latents; expected latent.size (128)",
                             f"models.0.sae: '{lens_a}' is a topk (k 8) SAE; expected relu (latent.activation, latent.k)"]
