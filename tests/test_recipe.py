"""Bad recipes: one clear line naming the field, exit code 2, no traceback, nothing written."""

import re
import subprocess
import sys

import pytest

from saemerge import RecipeError, load_recipe
from saemerge.cli import main
from conftest import recipe_dict


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "saemerge", *map(str, args)], capture_output=True, text=True)


def test_bad_recipe_through_the_real_command(zoo, tmp_path, write_recipe):
    raw = recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path / "out")
    raw["models"][0]["layer"] = 7
    raw["latent"]["sise"] = 3
    proc = run_cli("merge", write_recipe(raw))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'recipe.yaml'}: latent.sise: unknown key (got 3)"]
    del raw["latent"]["sise"]
    proc = run_cli("merge", write_recipe(raw))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: models.0.layer: block index 7 is out of range; expected 0..2"
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


# Regular expressions: the field and the value given are saemerge's; pydantic's own wording in between is not pinned.
@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r["latent"].update(size="big"), r"latent\.size: .+ \(got 'big'\)$"),
    (lambda r: r["latent"].update(activation="gelu"), r"latent\.activation: .+ \(got 'gelu'\)$"),
    (lambda r: r["latent"].update(activation="topk", k=999), r"latent: .*k=999 must not exceed size=64"),
    (lambda r: r["merge"].update(target="c"), r"merge\.target: 'c' is not a source; expected one of \['a', 'b'\]"),
    (lambda r: r["models"].pop(), r"models: .+ \(got \[\{"),
    (lambda r: r.pop("latent"), r"latent: missing; this field is required$"),
    (lambda r: r["models"][1].update(name="a"), r"models\.1\.name: 'a' is used twice"),
    (lambda r: r["train"].update(lr=-1), r"train\.lr: .+ \(got -1\)$"),
])
def test_schema_errors_name_the_field(zoo, tmp_path, write_recipe, capsys, mutate, expected):
    raw = recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path / "out")
    mutate(raw)
    assert main(["validate", str(write_recipe(raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: ") for line in err)
    assert re.search(expected, err[0]), err


def test_source_errors_are_all_reported(zoo, tmp_path, write_recipe, capsys):
    raw = recipe_dict(zoo["gpt2"], zoo["gpt2_other_tok"], tmp_path / "out", merge__heads="mean")
    raw["models"].append({"name": "c", "model": str(tmp_path / "missing"), "layer": 0})
    raw["models"].append({"name": "d", "model": str(zoo["llama"]), "layer": "model.nope"})
    raw["data"]["datasets"][0]["text_column"] = "body"
    assert main(["validate", str(write_recipe(raw))]) == 2
    err = capsys.readouterr().err
    assert f"models.2.model: folder '{tmp_path / 'missing'}' does not exist" in err
    assert "models.3.layer: no module 'model.nope' in LlamaForCausalLM" in err
    assert ("merge.heads: 'mean' mixes the sources' next-token distributions, which needs one tokenizer, and 'a' "
            "reads with another than 'b'; expected heads: target") in err
    assert "data.datasets.0.text_column: 'body' is not a column; expected one of ['source', 'text']" in err
    assert not (tmp_path / "out").exists()


def test_not_yaml_and_not_a_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    assert main(["validate", str(bad)]) == 2
    assert f"{bad}: not valid YAML" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "none.yaml")]) == 2
    assert "no such recipe file" in capsys.readouterr().err
    bad.write_text("- just\n- a list\n")
    assert main(["validate", str(bad)]) == 2
    assert "expected a YAML mapping" in capsys.readouterr().err


def test_set_overrides(zoo, tmp_path, write_recipe):
    path = write_recipe(recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path / "out"))
    recipe = load_recipe(path, ["train.seed=3", "latent.size=128", "models.1.layer=2", "merge.combine=sum"])
    assert (recipe.train.seed, recipe.latent.size, recipe.models[1].layer, recipe.merge.combine) == (3, 128, 2, "sum")
    with pytest.raises(RecipeError, match=r"latent\.size: .+ \(got 'lots'\)"):
        load_recipe(path, ["latent.size=lots"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["train.seed"])
    with pytest.raises(RecipeError, match="index 5 is out of range"):
        load_recipe(path, ["models.5=x"])


def test_validate_prints_resolved_layers(zoo, tmp_path, write_recipe, capsys):
    path = write_recipe(recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path / "out"))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layer 1 -> transformer.h.1" in out and "layer 1 -> model.layers.1" in out


def test_help_everywhere():
    for args in (["--help"], ["merge", "--help"], ["validate", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0
