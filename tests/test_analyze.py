"""`saemerge analyze`: decoder-based comparison of SAE dictionaries, on real SAE files written in tmp_path (ours,
SAELens, sparsify) and a merged-folder layout built from SparseAutoencoder.save."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from saemerge import SAEConfig, SparseAutoencoder, UserError, analyze, compare_saes
from saemerge.analyze import summary
from saemerge.cli import main
from saemerge.interchange import export_sae


def random_sae(d_in: int = 64, d_sae: int = 128, seed: int = 0, rows: torch.Tensor | None = None) -> SparseAutoencoder:
    """A TopK SAE with unit random decoder rows (or the given rows), an input scale that is not 1 and biases."""
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=8))
    with torch.no_grad():
        sae.init_random(g)
        if rows is not None:
            sae.W_dec.copy_(rows)
        sae.act_scale.fill_(2.5 + seed)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
    return sae


def permuted(sae: SparseAutoencoder, seed: int = 1, noise: float = 0.0) -> tuple[SparseAutoencoder, torch.Tensor]:
    """The same dictionary with its latents in another order (and some noise): row j of the copy is row perm[j]
    of `sae`."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(sae.cfg.d_sae, generator=g)
    rows = sae.W_dec[perm] + noise * torch.randn(sae.W_dec.shape, generator=g) / sae.cfg.d_in ** 0.5
    rows = rows / rows.norm(dim=-1, keepdim=True)  # unit rows, as the trainer keeps them
    return random_sae(sae.cfg.d_in, sae.cfg.d_sae, seed=seed, rows=rows.detach()), perm


def test_an_sae_against_itself_is_a_perfect_match():
    sae = random_sae()
    r = compare_saes(sae, sae)
    assert r["mmcs"]["a_to_b"] == pytest.approx(1.0, abs=1e-5) and r["mmcs"]["b_to_a"] == pytest.approx(1.0, abs=1e-5)
    assert r["matching"]["method"] == "exact" and r["matching"]["pairs"] == 128
    assert r["matching"]["above"]["0.9"] == 1.0
    assert "aligned_cosine" not in r and "relative_norm" not in r


@pytest.mark.parametrize("max_match", [4096, 16])  # exact Hungarian; candidate pairs (128 latents > 16)
def test_permuted_latents_are_matched_back(max_match):
    a = random_sae()
    b, perm = permuted(a, noise=0.3)
    r = compare_saes(a, b, max_match=max_match)
    pl = r["per_latent"]
    assert r["matching"]["method"] == ("exact" if max_match > 128 else "candidates")
    assert np.array_equal(perm.numpy()[pl["match_b"]], pl["match_a"])  # B's latent j paired with A's perm[j]
    assert r["matching"]["above"]["0.9"] == 1.0
    aligned = compare_saes(a, b, aligned=True, max_match=max_match)  # latent i vs latent i: unrelated rows
    assert aligned["aligned_cosine"]["mean"] < 0.1 and aligned["matching"]["same_index"] < 0.05
    assert aligned["matching"]["above"] == r["matching"]["above"]


def test_candidate_matching_is_close_to_exact_and_never_above():
    a, b = random_sae(seed=0), permuted(random_sae(seed=3), noise=2.0)[0]  # partly related, many conflicts
    exact, approx = compare_saes(a, b), compare_saes(a, b, max_match=32)
    assert approx["matching"]["method"] == "candidates" and approx["matching"]["pairs"] == 128
    assert len(set(approx["per_latent"]["match_b"])) == 128  # one to one
    assert approx["matching"]["mean_cosine"] <= exact["matching"]["mean_cosine"] + 1e-6
    assert approx["matching"]["mean_cosine"] > exact["matching"]["mean_cosine"] - 0.01
    assert approx["mmcs"] == exact["mmcs"]


def test_unrelated_dictionaries_have_low_cosines():
    r = compare_saes(random_sae(d_in=128, seed=0), random_sae(d_in=128, d_sae=256, seed=1))
    assert r["mmcs"]["a_to_b"] < 0.35 and r["mmcs"]["b_to_a"] < 0.35
    assert r["mmcs"]["a_to_b"] == pytest.approx(r["mmcs"]["chance_a_to_b"], abs=0.02)  # the level of no relation
    assert r["mmcs"]["b_to_a"] == pytest.approx(r["mmcs"]["chance_b_to_a"], abs=0.02)
    assert r["mmcs"]["chance_a_to_b"] > r["mmcs"]["chance_b_to_a"]  # more directions to choose from in B
    assert r["matching"]["pairs"] == 128 and r["matching"]["above"]["0.5"] == 0.0


def test_saelens_and_sparsify_files_give_our_numbers(tmp_path):
    a = random_sae()
    b, _ = permuted(a, noise=1.0)
    b.save(tmp_path / "ours")
    export_sae(b, tmp_path / "lens", "saelens")
    export_sae(b, tmp_path / "sparse", "sparsify")
    a.save(tmp_path / "a")
    results = [analyze(tmp_path / "a", tmp_path / name)["comparisons"][0] for name in ("ours", "lens", "sparse")]
    ours = results[0]
    for other in results[1:]:
        assert other["mmcs"] == pytest.approx(ours["mmcs"], abs=1e-6)
        assert other["matching"]["mean_cosine"] == pytest.approx(ours["matching"]["mean_cosine"], abs=1e-6)
        assert other["matching"]["above"] == ours["matching"]["above"]
        assert np.array_equal(other["per_latent"]["match_b"], ours["per_latent"]["match_b"])  # the same pairs
    assert not ours["aligned"] and "relative_norm" not in ours  # two folders, not of one merged folder


def test_relative_norm_finds_the_shared_half():
    """Half of the latents are in both dictionaries; the other half are A's alone (B's rows near zero)."""
    a = random_sae()
    rows = a.W_dec.detach().clone()
    rows[64:] *= 1e-3
    b = random_sae(rows=rows, seed=0)
    r = compare_saes(a, b, aligned=True)
    rel = r["per_latent"]["relative_norm"]
    assert np.allclose(rel[:64], 0.5, atol=1e-5) and (rel[64:] > 0.99).all()
    n = r["relative_norm"]
    assert n["shared"] == 0.5 and n["a_only"] == 0.5 and n["b_only"] == 0.0 and n["zero_in_both"] == 0
    assert "50.0% of latents A's alone" in summary({"comparisons": [{**r, "a": {"name": "A", "path": "a", **r["a"]},
                                                                     "b": {"name": "B", "path": "b", **r["b"]},
                                                                     "site": None, "notes": [],
                                                                     "plots": {"max_cosine": "m", "matched_cosine": "c",
                                                                               "relative_norm": "r"}}]})
    assert r["aligned_cosine"]["above"]["0.9"] == 1.0  # directions unchanged: only norms differ


@pytest.fixture
def merged(tmp_path):
    """A merged-folder layout: sources p and c at site 0 (width 64, p's rows a permutation of c's: latent i is not
    the same direction) and site 1 (widths 32 and 48), as `saemerge merge` lays it out."""
    root = tmp_path / "merged"
    p = random_sae(seed=0)
    c, _ = permuted(p, noise=0.2)
    p.save(root / "saes/p/transformer.h.1")
    c.save(root / "saes/c/model.layers.1")
    random_sae(d_in=32, d_sae=64, seed=2).save(root / "saes/p/transformer.h.2")
    random_sae(d_in=48, d_sae=64, seed=3).save(root / "saes/c/model.layers.2")
    sites = [{"layers": {"p": "transformer.h.1", "c": "model.layers.1"}},
             {"layers": {"p": "transformer.h.2", "c": "model.layers.2"}}]
    (root / "metrics.json").write_text(json.dumps({"sites": sites}))
    return root


def test_cli_on_a_merged_folder_writes_json_markdown_and_plots(merged, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", str(merged), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    numbers = json.loads((out / "analysis.json").read_text())
    first, second = numbers["comparisons"]
    assert first["aligned"] and first["site"] == "transformer.h.1 / model.layers.1"
    assert first["matching"]["above"]["0.9"] == 1.0 and first["aligned_cosine"]["mean"] < 0.1
    assert first["relative_norm"]["std"] < 1e-3  # unit rows in both: the measure says nothing here
    assert not second["decoder_cosines"] and "mmcs" not in second and set(second["plots"]) == {"relative_norm"}
    md = (out / "analysis.md").read_text()
    assert md in printed
    assert "cannot tell shared latents from one-sided ones" in md and "decoder cosines: skipped" in md
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == sorted(name for c in numbers["comparisons"] for name in c["plots"].values())
    assert len(pngs) == 4
    for png in pngs:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
            assert np.asarray(image.convert("L")).std() > 0  # something drawn
    assert not list(tmp_path.glob(".analysis.tmp-*"))
    # an existing output is refused, replaced with --overwrite
    assert main(["analyze", str(merged), "--output", str(out)]) == 2
    assert "--output:" in capsys.readouterr().err
    assert main(["analyze", str(merged), "--output", str(out), "--overwrite", "--max-match", "8"]) == 0
    assert json.loads((out / "analysis.json").read_text())["comparisons"][0]["matching"]["method"] == "candidates"


def test_two_saes_of_one_merged_site_are_aligned(merged, tmp_path):
    saes = merged / "saes"
    report = analyze(saes / "p/transformer.h.1", saes / "c/model.layers.1")
    assert report["comparisons"][0]["aligned"] and "relative_norm" in report["comparisons"][0]
    export_sae(SparseAutoencoder.load(saes / "p/transformer.h.1"), tmp_path / "lens_p", "saelens")
    assert not analyze(tmp_path / "lens_p", saes / "c/model.layers.1")["comparisons"][0]["aligned"]
    forced = analyze(tmp_path / "lens_p", saes / "c/model.layers.1", aligned=True)["comparisons"][0]
    same = report["comparisons"][0]
    assert forced["aligned_cosine"]["mean"] == pytest.approx(same["aligned_cosine"]["mean"], abs=1e-6)
    # the export folds act_scale (2.5 here, c's 3.5) into the rows: relative norms are in each file's units
    assert forced["relative_norm"]["mean"] == pytest.approx(2.5 / (2.5 + 1), abs=1e-5)


def test_bad_input_is_one_line_naming_the_argument_and_exit_2(merged, tmp_path, capsys):
    saes = merged / "saes"
    (tmp_path / "empty").mkdir()
    random_sae(d_sae=256).save(tmp_path / "wide")
    cases = [
        ([str(tmp_path / "missing")], "A: "),
        ([str(tmp_path / "empty")], "A: "),
        ([str(saes / "p/transformer.h.1")], "B: missing"),
        ([str(saes / "p/transformer.h.1"), str(merged)], "B: "),
        ([str(saes / "p/transformer.h.1"), str(saes / "p/transformer.h.2")], "B: d_in 32"),
        ([str(saes / "p/transformer.h.1"), str(tmp_path / "wide"), "--aligned"], "--aligned: "),
        ([str(merged), "--max-match", "0"], "--max-match: "),
    ]
    for args, start in cases:
        assert main(["analyze", *args]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), (args, lines)
    with pytest.raises(UserError, match="merged model folder"):
        analyze(merged, saes / "c/model.layers.1")


def test_help_describes_the_command(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["analyze", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert "merged model folder" in text and "--max-match" in text and "SAELens" in text
