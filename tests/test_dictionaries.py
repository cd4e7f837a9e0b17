"""`saemerge train-saes`: dictionaries at many sites of one model (residual, attention and MLP outputs) from one
harvest, on real tiny models; a merge recipe reused without merging; the folder read back, exported and browsed;
one-line errors."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from saemerge.cli import main
from saemerge.dictionaries import load_dictionaries
from saemerge.errors import RecipeError
from saemerge.hooks import run_to_layers
from conftest import REPO, SITES, recipe_dict


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_model_many_sites(dictionaries, zoo, family):
    folder = dictionaries(family)
    dicts = load_dictionaries(folder)
    model = AutoModelForCausalLM.from_pretrained(zoo["gpt2_trained" if family == "gpt2" else family]).eval()
    assert len(dicts.paths) == len(SITES[family]) == 5
    assert dicts.paths[1].endswith(("attn", "self_attn")) and dicts.paths[2].endswith("mlp")
    metrics = json.loads((folder / "metrics.json").read_text())
    ids = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        acts = run_to_layers(model, dicts.paths, ids)
    for site, (sae, x) in enumerate(zip(dicts.saes, acts)):
        assert sae.cfg.d_in == x.shape[-1] and sae.cfg.d_sae == 64
        # every site's SAE explains its own activations (the attention output is not the residual stream's)
        m = metrics["sites"][site]["sources"]["m"]
        assert m["explained_variance"] > 0.5 and m["l0"] == pytest.approx(8, abs=0.01)
    # one SAE per site: not one SAE copied to several sites
    assert not torch.equal(dicts.saes[0].W_dec, dicts.saes[3].W_dec)
    assert (folder / "training_curves.png").stat().st_size > 1000
    assert "| m | `" in (folder / "README.md").read_text()
    assert not any(folder.glob("*.safetensors"))  # no model weights: dictionaries only


def test_a_merge_recipe_trains_its_saes_without_merging(zoo, tmp_path, write_recipe, capsys):
    raw = recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path / "merged", data__tokens=1024)
    raw["distill"] = {"tokens": 512}
    output = tmp_path / "dicts"
    assert main(["train-saes", str(write_recipe(raw)), "--output", str(output), "--quiet"]) == 0
    assert "dictionaries written to" in capsys.readouterr().out
    assert sorted(p.parent.parent.name for p in output.glob("saes/*/*/cfg.json")) == ["a", "b"]
    assert "merge" not in yaml.safe_load((output / "recipe.yaml").read_text())
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged-distilled").exists()
    assert load_dictionaries(output, "b").paths == ["model.layers.1"]
    with pytest.raises(RecipeError, match="'c' is not a source"):
        load_dictionaries(output, "c")


def test_export_and_browse_a_dictionary_folder(dictionaries, tmp_path):
    folder = tmp_path / "dicts"
    shutil.copytree(dictionaries("gpt2"), folder)
    assert main(["links", str(folder), "--upstream", "0", "--downstream", "3", "--tokens", "256", "--features", "4",
                 "--quiet"]) == 0  # into folder/links-0-3, which the browser shows
    assert main(["export-saes", str(folder), str(tmp_path / "lens")]) == 0
    exported = sorted(p.parent.name for p in (tmp_path / "lens").rglob("cfg.json"))
    assert exported == sorted(load_dictionaries(folder).paths)
    weights = load_file(tmp_path / "lens" / "m" / "transformer.h.1.mlp" / "sae_weights.safetensors")
    assert weights["W_dec"].shape == (64, 32)
    assert main(["report", str(folder), "--output", str(tmp_path / "browser"), "--tokens", "512", "--latents", "4",
                 "--quiet"]) == 0
    index = (tmp_path / "browser" / "index.html").read_text()
    assert '<img class="plot" src="analyses/links-0-3/links.png"' in index and "Spearman" in index
    assert (tmp_path / "browser" / "analyses" / "links-0-3" / "links.png").stat().st_size > 1000


def test_errors_are_one_line(zoo, tmp_path, write_recipe, capsys):
    raw = {"name": "d", "models": [{"name": "m", "model": str(zoo["gpt2"]), "layer": [0, "transformer.h.9.mlp"]}],
           "latent": {"size": 16, "k": 4}, "data": recipe_dict(zoo["gpt2"], zoo["gpt2"], tmp_path)["data"],
           "output": str(tmp_path / "out")}
    assert main(["train-saes", str(write_recipe(raw))]) == 2
    assert "models.0.layer: no module 'transformer.h.9.mlp'" in capsys.readouterr().err
    raw["models"][0]["layer"] = [0]
    (tmp_path / "out").mkdir()
    assert main(["train-saes", str(write_recipe(raw))]) == 2
    assert "output: " in capsys.readouterr().err and not any(tmp_path.glob(".out*"))
    # a merge needs two sources: the message names the field
    raw["merge"] = {"target": "m"}
    assert main(["merge", str(write_recipe(raw))]) == 2
    assert "models: List should have at least 2 items" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="expected a folder written by `saemerge train-saes`"):
        load_dictionaries(tmp_path)


def test_sigterm_then_resume_gives_the_uninterrupted_dictionaries(zoo, tmp_path, write_recipe):
    raw = {"name": "d", "models": [{"name": "m", "model": str(zoo["gpt2"]), "layer": [0, "transformer.h.1.mlp"]}],
           "latent": {"size": 32, "k": 4}, "data": recipe_dict(zoo["gpt2"], zoo["gpt2"], tmp_path)["data"],
           "train": {"batch_tokens": 512, "checkpoint_every": 4, "eval_tokens": 256}, "output": str(tmp_path / "out")}
    raw["data"]["tokens"] = 40 * 512
    path = write_recipe(raw)
    assert main(["train-saes", str(path), "--quiet", "--output", str(tmp_path / "straight")]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "saemerge", "train-saes", str(path), "--quiet"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state, deadline = tmp_path / ".out.checkpoint" / "state.json", time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        try:
            if json.loads(state.read_text())["step"] >= 4:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130 and not (tmp_path / "out").exists()
    assert main(["train-saes", str(path), "--quiet", "--resume"]) == 0
    for site in ("transformer.h.0", "transformer.h.1.mlp"):
        resumed = load_file(tmp_path / "out" / "saes" / "m" / site / "sae.safetensors")
        straight = load_file(tmp_path / "straight" / "saes" / "m" / site / "sae.safetensors")
        assert all(resumed[k].equal(straight[k]) for k in straight)
