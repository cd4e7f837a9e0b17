"""`saemerge features`: evolution, clusters, splitting and subsets, on the dictionaries fixture (tiny real models,
SAEs trained for a few seconds on real text) and on SAEs built from it so that the right answer is known."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from saemerge.cli import main
from saemerge.dictionaries import load_dictionaries
from saemerge.errors import UserError
from saemerge.feature_clusters import average_clusters, feature_clusters
from saemerge.feature_evolution import feature_evolution, write_sites
from saemerge.feature_splitting import feature_splitting
from saemerge.feature_subsets import feature_subsets
from saemerge.sae import SparseAutoencoder

TOKENS = 2048


def test_a_dictionary_matched_with_itself_chains_through_every_residual_site(dictionaries):
    d = load_dictionaries(dictionaries("gpt2"))
    same = dataclasses.replace(d, saes=[d.saes[0]] * len(d.paths))  # one dictionary at every site
    r = feature_evolution(same, tokens=0, progress=False)
    n = d.saes[0].cfg.d_sae
    assert [s["path"] for s in r["sites"]] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert [s["origin"]["carried"] for s in r["sites"]] == [0, n, n]
    assert r["persistence"]["transformer.h.0"] == {"born": n, "lifetime_counts": [0, 0, n]}
    assert r["persistence"]["transformer.h.2"]["born"] == 0
    assert r["last_site"]["first_site"] == {"transformer.h.0": n, "transformer.h.1": 0, "transformer.h.2": 0}
    assert r["last_site"]["mean_chain_length"] == 3
    assert r["chance_cosine"] < 0.7


def test_new_features_are_credited_to_the_write_that_holds_them(dictionaries):
    d = load_dictionaries(dictionaries("gpt2"))
    # Block 1's output holds the attention dictionary's features: those not carried from block 0 are attention's.
    saes = [d.saes[0], d.saes[3], d.saes[2], d.saes[3], d.saes[4]]
    r = feature_evolution(dataclasses.replace(d, saes=saes), tokens=0, progress=False)
    h1 = r["sites"][1]
    new = d.saes[3].cfg.d_sae - h1["origin"]["carried"]
    assert new > 0 and h1["origin"]["attention"] == new and h1["origin"]["neither"] == 0
    assert h1["writes"] == {"attention": ["transformer.h.1.attn"], "mlp": ["transformer.h.1.mlp"]}
    assert r["sites"][2]["origin"]["unattributed"] == r["sites"][2]["live"] - r["sites"][2]["origin"]["carried"]


def test_writes_are_found_by_module_path_or_named(dictionaries):
    paths = load_dictionaries(dictionaries("llama")).paths
    residual = [0, 3, 4]
    assert write_sites(paths, residual) == {0: {"attention": [], "mlp": []}, 3: {"attention": [1], "mlp": [2]},
                                            4: {"attention": [], "mlp": []}}
    assert write_sites(paths, residual, mlp=["model.layers.1.self_attn"])[3] == {"attention": [], "mlp": [1]}
    with pytest.raises(UserError, match="--attention: 'model.layers.0' is inside no"):
        write_sites(paths, [3, 4], attention=["model.layers.0"])


def test_evolution_on_live_features_and_its_files(dictionaries, tmp_path, capsys):
    out, folder = tmp_path / "evolution", str(dictionaries("llama"))
    assert main(["features", "evolution", folder, "--control", folder, "--tokens", str(TOKENS), "--output", str(out),
                 "--quiet"]) == 0
    assert "| `model.layers.1` |" in capsys.readouterr().out
    r = json.loads((out / "evolution.json").read_text())
    for s in r["sites"]:
        assert sum(s["origin"].values()) == s["live"] <= s["latents"]
    for s in r["sites"][1:]:  # the folder as its own control: the same matches
        assert s["across_seeds"] == {"carried": s["matched_from_previous"]["above_threshold"], "same_site": s["live"]}
        assert 0 <= s["matched_from_previous"]["same_index"] <= 1
    assert sum(r["last_site"]["first_site"].values()) == r["sites"][-1]["live"]
    assert sum(p["born"] for p in r["persistence"].values()) == sum(
        sum(p["lifetime_counts"]) for p in r["persistence"].values())
    assert "# Feature evolution" in (out / "evolution.md").read_text()
    assert Image.open(out / "evolution.png").size[0] > 500


def test_average_linkage_recovers_planted_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    x = torch.nn.functional.normalize(centres.repeat_interleave(10, 0) + 0.1 * torch.randn(30, 32, generator=g), dim=-1)
    labels = average_clusters((x @ x.T).double().numpy(), 3)
    assert sorted(np.bincount(labels).tolist()) == [10, 10, 10]
    assert all(len(set(labels[i:i + 10])) == 1 for i in (0, 10, 20))


def test_clusters_label_every_live_feature_and_list_snippets(dictionaries, tmp_path):
    d = load_dictionaries(dictionaries("gpt2"))
    r = feature_clusters(d, "transformer.h.1", clusters=4, tokens=TOKENS, top=2, members=2,
                         output=tmp_path / "c", progress=False)
    assert -1 <= r["adjusted_rand_index"] <= 1
    for kind in ("decoder", "coactivation"):
        assert len(r["labels"][kind]) == r["clustered"] and set(r["labels"][kind].values()) <= set(range(4))
        assert sum(r["sizes"][kind]) == r["clustered"]
        top = r["largest"][kind][0]
        assert top["size"] == r["sizes"][kind][0]
        assert any("[[" in s for m in top["members"] for s in m["snippets"])
    assert (tmp_path / "c" / "clusters.png").is_file() and "adjusted Rand" in (tmp_path / "c" / "clusters.md").read_text()


def test_split_trees_give_every_larger_feature_exactly_one_parent(dictionaries, tmp_path):
    small, large = dictionaries("gpt2", 32), dictionaries("gpt2", 64)
    r = feature_splitting([large, small], tokens=0, output=tmp_path / "s", progress=False)  # sorted by size
    assert r["sizes"] == [32, 64] and len(r["sites"]) == 5
    trees = json.loads((tmp_path / "s" / "trees.json").read_text())
    for path, site in r["sites"].items():
        children = [c["latent"] for tree in trees[path] for c in tree["children"]]
        assert sorted(children) == list(range(64))
        assert len(trees[path]) == 32
        (step,) = site["steps"]
        assert sum(step["parents_with"].values()) == 32 and -1 <= step["mean_cosine"] <= 1
    with pytest.raises(UserError, match="different sizes"):
        feature_splitting([small, small], tokens=0, progress=False)


def test_a_dictionary_is_a_full_subset_of_itself(dictionaries, tmp_path):
    folder = dictionaries("gpt2")
    r = feature_subsets(folder, folder, control=folder, tokens=TOKENS, output=tmp_path / "sub", progress=False)
    for site in r["sites"].values():
        for pair in ("subset_vs_full", "control_vs_full"):
            assert site[pair]["in_full"] == site[pair]["one_to_one"] == 1.0 and site[pair]["full_without"] == 0.0
        assert site["quality"]["subset"] == site["quality"]["full"]
    # A copy whose block-1 dictionary is replaced by random directions: found nowhere in D, the rest all found.
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    sae = SparseAutoencoder.load(other / "saes/m/transformer.h.1")
    sae.init_random(torch.Generator().manual_seed(1))
    sae.save(other / "saes/m/transformer.h.1")
    r = feature_subsets(other, folder, tokens=TOKENS, progress=False)
    assert r["sites"]["transformer.h.1"]["subset_vs_full"]["in_full"] == 0
    assert r["sites"]["transformer.h.1"]["subset_vs_full"]["full_without"] == 1
    assert r["sites"]["transformer.h.2"]["subset_vs_full"]["in_full"] == 1
    assert r["sites"]["transformer.h.1"]["quality"]["subset"]["explained_variance"] < \
        r["sites"]["transformer.h.1"]["quality"]["full"]["explained_variance"]
    assert "| `transformer.h.1.attn` | 100.0% (control 100.0%) |" in (tmp_path / "sub" / "subset.md").read_text()


def test_bad_input_is_one_line_naming_the_argument_and_exit_2(dictionaries, tmp_path, capsys):
    gpt2, llama = str(dictionaries("gpt2")), str(dictionaries("llama"))
    (tmp_path / "taken").mkdir()
    cases = [(["evolution", gpt2, "--attention", "transformer.h.9.attn"], "--attention:"),
             (["evolution", gpt2, "--threshold", "1.5"], "--threshold:"),
             (["evolution", gpt2, "--control", llama], "--control:"),
             (["evolution", gpt2, "--output", str(tmp_path / "taken")], "--output:"),
             (["evolution", str(tmp_path / "missing")], "DIR:"),
             (["clusters", gpt2, "--site", "transformer.h.7"], "--site:"),
             (["clusters", gpt2, "--clusters", "1"], "--clusters:"),
             (["clusters", gpt2, "--tokens", "0"], "--tokens:"),
             (["clusters", gpt2, "--data", str(tmp_path / "none.jsonl")], "--data:"),
             (["split", gpt2], "FOLDERS:"),
             (["split", gpt2, gpt2], "FOLDERS:"),
             (["subset", llama, gpt2], "SUBSET:")]
    for args, start in cases:
        assert main(["features", *args, "--quiet"]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), (args, lines)
