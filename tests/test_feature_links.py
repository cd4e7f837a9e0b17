"""saemerge links: ablation effects and attributions between the features of two sites, on tiny real models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from scipy.stats import spearmanr

from saemerge.cli import main
from saemerge.feature_links import feature_links
from saemerge.sae import SparseAutoencoder


def matrix(report: dict, key: str = "effect") -> tuple[torch.Tensor, list[int], list[int]]:
    """The edges as an [upstream, downstream] matrix in the order of the report's features."""
    up = [f["feature"] for f in report["upstream_features"]]
    down = [f["feature"] for f in report["downstream_features"]]
    m = torch.zeros(len(up), len(down))
    for e in report["edges"]:
        m[up.index(e["upstream"]), down.index(e["downstream"])] = e[key]
    return m, up, down


def self_effects(effect: torch.Tensor, up: list[int], down: list[int]) -> torch.Tensor:
    """effect[i -> i] for every upstream latent i (latent i of the downstream site)."""
    return torch.stack([effect[n, down.index(i)] for n, i in enumerate(up)])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_feature_drives_itself_at_the_next_residual_site(dictionaries, family):
    # Every site's SAE starts from the same token rows (latent i is one token's activation at each site), and the
    # residual stream after block 2 carries on what it had after block 1: zeroing latent i at block 1 lowers
    # latent i at block 2, and more than it moves the other latents.
    report = feature_links(dictionaries(family), "3", 4, tokens=1024, upstream_features=32,
                           downstream_features=list(range(64)), progress=False)
    assert report["upstream"]["path"].endswith(".1") and report["downstream"]["path"].endswith(".2")
    effect, up, down = matrix(report)
    self_effect = self_effects(effect, up, down)
    others = torch.ones_like(effect, dtype=torch.bool)
    others[range(len(up)), [down.index(i) for i in up]] = False
    assert (self_effect > 0).all()
    assert self_effect.mean() > 5 * effect[others].abs().mean()  # measured: 8.7x (gpt2), 20x (llama)
    stronger = (effect > self_effect[:, None]).sum(1)  # other downstream latents that i lowers more
    assert (stronger <= 1).float().mean() >= 0.5  # measured: 72% (gpt2), 100% (llama)


def test_a_feature_that_never_fires_has_no_effect(dictionaries, tmp_path):
    folder = tmp_path / "dicts"
    shutil.copytree(dictionaries("gpt2"), folder)
    first = feature_links(folder, 3, 4, tokens=512, upstream_features=2, downstream_features=16, progress=False)
    silenced, live = [f["feature"] for f in first["upstream_features"]]
    sae_folder = folder / "saes/m/transformer.h.1"
    sae = SparseAutoencoder.load(sae_folder)
    with torch.no_grad():
        sae.b_enc[silenced] = -1e4  # never among the top k again
    sae.save(sae_folder)

    for ablation in ("zero", "resample"):
        report = feature_links(folder, 3, 4, tokens=512, upstream_features=[silenced, live], downstream_features=16,
                               ablation=ablation, progress=False)
        assert report["upstream_features"][0]["firing_rate"] == 0
        effect, _, _ = matrix(report)
        attribution, _, _ = matrix(report, "attribution")
        assert (effect[0] == 0).all() and (attribution[0] == 0).all()
        assert effect[1].abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attribution_agrees_with_ablation(dictionaries, family):
    # Block 0 -> block 2, through two blocks; the 32 most active features at each end (all of them fire).
    report = feature_links(dictionaries(family), 0, 4, tokens=1024, upstream_features=32, downstream_features=32,
                           progress=False)
    a = report["agreement"]
    assert a["pairs"] == 32 * 32
    assert a["spearman"] > 0.6 and a["pearson"] > 0.6 and a["top_k_overlap"] >= 0.5
    effect, _, _ = matrix(report)
    attribution, _, _ = matrix(report, "attribution")
    shuffled = attribution.flatten()[torch.randperm(len(effect.flatten()), generator=torch.Generator().manual_seed(0))]
    chance = spearmanr(effect.flatten(), shuffled).statistic
    assert abs(chance) < 0.15  # what a Spearman of no agreement looks like here


def test_resample_ablation_differs_from_zero_ablation(dictionaries):
    kwargs = dict(tokens=512, upstream_features=16, downstream_features=list(range(64)), progress=False)
    zero, up, down = matrix(feature_links(dictionaries("llama"), 3, 4, **kwargs))
    resample, _, _ = matrix(feature_links(dictionaries("llama"), 3, 4, ablation="resample", **kwargs))
    assert (zero - resample).abs().max() > 0.1 * zero.abs().max()
    # Resampling gives each token another token's activation: the feature keeps its mean, so it removes less.
    assert 0 < self_effects(resample, up, down).mean() < self_effects(zero, up, down).mean()


def test_cli_writes_the_edges_the_drawing_and_the_summary(dictionaries, tmp_path, capsys):
    output = tmp_path / "links"
    code = main(["links", str(dictionaries("gpt2")), "--upstream", "transformer.h.1.attn", "--downstream", "3",
                 "--tokens", "512", "--features", "12", "--top-edges", "10", "--quiet", "--output", str(output)])
    assert code == 0
    assert "Spearman" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["links"]  # no temporary folder left beside it
    report = json.loads((output / "links.json").read_text())
    assert report["upstream"] == {"site": 1, "path": "transformer.h.1.attn"}
    assert len(report["edges"]) == len(report["upstream_features"]) * len(report["downstream_features"])
    sizes = [abs(e["effect"]) for e in report["edges"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 0
    for e in report["edges"][:10]:  # every feature at either end of a drawn edge has its snippets
        for end in ("upstream", "downstream"):
            snippets = report["snippets"][end][str(e[end])]
            assert snippets and "[[" in snippets[0]["text"] and snippets[0]["activation"] > 0
    assert set(report["seconds"]) >= {"ablation", "attribution"}
    assert "| upstream | downstream | effect | attribution |" in (output / "links.md").read_text()
    assert (output / "links.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--upstream", "transformer.h.9", "--downstream", "4"], "--upstream: 'transformer.h.9' is not a site"),
    (["--upstream", "4", "--downstream", "transformer.h.0"], "--downstream: site 0 (transformer.h.0) is not after"),
    (["--upstream", "0", "--downstream", "4", "--output", "EXISTING"], "--output: '"),
])
def test_cli_refuses_bad_input_with_one_line(dictionaries, tmp_path, capsys, args, message):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    args = [str(existing) if a == "EXISTING" else a for a in args]
    assert main(["links", str(dictionaries("gpt2")), *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: " + message)
    assert (existing / "keep.txt").read_text() == "mine"
