"""Bad sources, bad data and untrusted files, on real files: pickles refused unless --allow-pickle, corrupt or
contradicting safetensors, empty datasets, too little disk space, nothing written outside the output folder.
Each problem is one line naming the field, exit code 2, nothing written."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from saemerge import RecipeError, load_source
from saemerge.cli import main
from saemerge.evaluate import load_merged
from saemerge.files import inside
from saemerge.recipe import SourceSpec
from conftest import CODE, REPO, recipe_dict

PICKLE_HINT = "expected *.safetensors weights — convert it, or pass --allow-pickle if you trust the file"
TINY = dict(train__eval_tokens=256, data__tokens=1024)  # the smallest merge that trains a few steps


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def errors_of(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("error: ") for line in err), err
    return [line.removeprefix("error: ") for line in err]


def write(raw, folder):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def bad(zoo, tmp_path_factory):
    """Source folders with bad weights, each with config.json and the shared tokenizer."""
    root = tmp_path_factory.mktemp("bad")
    folders = {}
    # pytorch_model.bin only: transformers 5 still writes safetensors only, so torch.save the state dict.
    state = load_file(zoo["gpt2"] / "model.safetensors")
    folders["pickled"] = root / "pickled"
    shutil.copytree(zoo["gpt2"], folders["pickled"])
    (folders["pickled"] / "model.safetensors").unlink()
    torch.save(state, folders["pickled"] / "pytorch_model.bin")
    # A copy whose model.safetensors lost its last half.
    folders["truncated"] = root / "truncated"
    shutil.copytree(zoo["gpt2"], folders["truncated"])
    weights = folders["truncated"] / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    # Weights 32 wide under a config.json that says hidden_size 48 (edited by hand, as a user might).
    folders["contradicting"] = root / "contradicting"
    shutil.copytree(zoo["llama"], folders["contradicting"])
    narrow = AutoConfig.from_pretrained(zoo["llama"], hidden_size=32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(narrow).save_pretrained(folders["contradicting"])
    config = folders["contradicting"] / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 32', '"hidden_size": 48'))
    # No weights at all.
    folders["empty"] = root / "empty"
    shutil.copytree(zoo["gpt2"], folders["empty"])
    (folders["empty"] / "model.safetensors").unlink()
    return folders


def bad_data(folder):
    """An empty json file, one with zero rows, one whose texts are all empty."""
    (folder / "empty.jsonl").write_text("")
    (folder / "no_rows.json").write_text("[]")
    (folder / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n{"text": ""}\n')
    names = ("empty.jsonl", "no_rows.json", "blank.jsonl")
    return [{"path": "json", "data_files": str(folder / name)} for name in names]


def test_every_bad_source_and_dataset_is_reported_at_once(zoo, bad, tmp_path, capsys):
    """One line per problem, exit code 2, nothing written (the real process, without a traceback, is
    test_hub_repo_with_only_pickles)."""
    raw = recipe_dict(bad["pickled"], bad["truncated"], tmp_path / "out")
    raw["models"] += [{"name": "c", "model": str(bad["contradicting"]), "layer": 1},
                      {"name": "d", "model": str(bad["empty"]), "layer": 1}]
    raw["data"]["datasets"] = bad_data(tmp_path) + [{"path": "json", "data_files": str(CODE), "text_column": "body"}]
    recipe = write(raw, tmp_path)
    before = files_under(tmp_path)
    assert main(["validate", str(recipe)]) == 2
    errors = errors_of(capsys)
    # Then safetensors' own words, which are safetensors' and change between its releases: not pinned.
    assert errors.pop(1).startswith(f"models.1.model: '{bad['truncated'] / 'model.safetensors'}' is not a readable "
                                    "safetensors file: ")
    assert errors == [
        f"models.0.model: '{bad['pickled']}' holds pytorch_model.bin, a pickle (loading it can run code); "
        + PICKLE_HINT,
        f"models.2.model: '{bad['contradicting'] / 'model.safetensors'}' has lm_head.weight [400, 32]; expected "
        "[400, 48] from config.json (hidden_size 48?); 29 other tensors differ too",
        f"models.3.model: '{bad['empty']}' holds no weights; expected *.safetensors weights",
        f"data.datasets.0: dataset 'json' {tmp_path / 'empty.jsonl'} has no rows; expected rows with a 'text' column",
        f"data.datasets.1: dataset 'json' {tmp_path / 'no_rows.json'} has no rows; expected rows with a 'text' column",
        f"data.datasets.2.text_column: 'text' is empty in all 3 rows of dataset 'json' {tmp_path / 'blank.jsonl'}; "
        "expected text to train on",
        "data.datasets.3.text_column: 'body' is not a column; expected one of ['source', 'text']",
    ]
    assert main(["merge", str(recipe), "--quiet"]) == 2  # merge refuses the same way, before writing anything
    assert files_under(tmp_path) == before


def test_pickled_source_refused_then_merged_with_allow_pickle(zoo, bad, tmp_path, capsys):
    """The pickle loads and merges only with --allow-pickle; the merge writes only its output folder, about as
    many bytes as `validate` said."""
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "keep.txt").write_text("mine")
    raw = recipe_dict(bad["pickled"], zoo["gpt2_b"], parent / "out", **TINY)
    recipe = write(raw, tmp_path)
    before = files_under(tmp_path)
    for command in ("validate", "merge"):
        assert main([command, str(recipe)]) == 2
        assert errors_of(capsys) == [f"models.0.model: '{bad['pickled']}' holds pytorch_model.bin, a pickle "
                                     f"(loading it can run code); {PICKLE_HINT}"]
        assert files_under(tmp_path) == before
    assert main(["validate", str(recipe), "--allow-pickle"]) == 0
    said = capsys.readouterr().out
    estimate = float(said.split("will write about ")[1].split(" MB")[0]) * 1e6

    assert main(["merge", str(recipe), "--quiet", "--no-eval", "--allow-pickle"]) == 0
    new = sorted(set(files_under(tmp_path)) - set(before))
    assert all(name == "parent/out" or name.startswith("parent/out/") for name in new), new
    assert set(before) <= set(files_under(tmp_path)) and (parent / "keep.txt").read_text() == "mine"

    merged = AutoModelForCausalLM.from_pretrained(parent / "out")
    assert torch.equal(merged.sources["a"].transformer.wte.weight, torch.load(bad["pickled"] / "pytorch_model.bin")[
        "transformer.wte.weight"])
    # The estimate: every safetensors file written (weights, SAEs twice) + 10 MB for the rest, to 0.1 MB.
    written = sum(p.stat().st_size for p in (parent / "out").rglob("*.safetensors"))
    assert abs(estimate - 10e6 - written) < 0.1e6, (estimate, written)
    assert sum(p.stat().st_size for p in (parent / "out").rglob("*") if p.is_file()) < estimate


def test_pickled_adapter_refused_then_allowed(zoo, lora, tmp_path, capsys):
    folder, _ = lora
    pickled = tmp_path / "adapter"
    shutil.copytree(folder, pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    raw = recipe_dict(zoo["llama"], zoo["gpt2"], tmp_path / "out")
    raw["models"][0]["adapter"] = str(pickled)
    recipe = write(raw, tmp_path)
    assert main(["validate", str(recipe)]) == 2
    assert errors_of(capsys) == [f"models.0.adapter: '{pickled}' holds adapter_model.bin, a pickle (loading it can "
                                 "run code); expected adapter_model.safetensors — convert it, or pass --allow-pickle "
                                 "if you trust the file"]
    assert main(["validate", str(recipe), "--allow-pickle"]) == 0
    spec = SourceSpec(name="l", model=str(zoo["llama"]), adapter=str(pickled), layer=1)
    with pytest.raises(OSError, match="has no adapter_model.safetensors"):  # what a by-reference load meets
        load_source(spec)
    ids = torch.arange(1, 17)[None]
    expected = load_source(SourceSpec(name="l", model=str(zoo["llama"]), adapter=str(folder), layer=1))(ids).logits
    assert torch.equal(load_source(spec, allow_pickle=True)(ids).logits, expected)
    assert not (tmp_path / "out").exists()


def test_hub_repo_with_only_pickles(zoo, bad, tmp_path):
    """A Hub id cannot be checked before loading: the refusal comes when `merge` loads it, as one line. The repo
    is served from a real Hugging Face cache, offline."""
    snapshot = tmp_path / "hub" / "models--someone--pickled" / "snapshots" / ("0" * 40)
    shutil.copytree(bad["pickled"], snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    raw = recipe_dict(zoo["gpt2"], zoo["gpt2_b"], tmp_path / "out", **TINY)
    raw["models"][0]["model"] = "someone/pickled"
    recipe = write(raw, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    before = files_under(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "saemerge", "merge", str(recipe), "--quiet", "--no-eval"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # Source b loads (with transformers' progress bar) so that its problems, if any, would be reported too.
    assert [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("Loading weights")] == [
        "error: models.0: cannot load 'someone/pickled': 'someone/pickled' has no *.safetensors weights; expected "
        "safetensors (if it holds pickle weights such as pytorch_model.bin and you trust them, pass --allow-pickle "
        "/ allow_pickle=True)"]
    assert files_under(tmp_path) == before


def test_eval_of_a_merge_referencing_a_pickle(zoo, bad, tmp_path, capsys):
    """A folder stored by reference loads its sources again: a pickled one only with --allow-pickle."""
    raw = recipe_dict(bad["pickled"], zoo["gpt2_b"], tmp_path / "out", **TINY)
    raw["save"] = {"storage": "reference"}
    assert main(["merge", str(write(raw, tmp_path)), "--quiet", "--no-eval", "--allow-pickle"]) == 0
    capsys.readouterr()
    tasks = ["--tasks", "saemerge_code", "--include-path", str(REPO / "eval/tasks")]
    assert main(["eval", str(tmp_path / "out"), *tasks]) == 2
    [line] = errors_of(capsys)
    assert line.startswith(f"{tmp_path / 'out'}: {tmp_path / 'out'} is stored by reference and its source 'a'")
    assert "has no *.safetensors weights" in line and "--allow-pickle" in line
    model, _ = load_merged(tmp_path / "out", allow_pickle=True)
    assert torch.equal(model.sources["a"].transformer.wte.weight,
                       torch.load(bad["pickled"] / "pytorch_model.bin")["transformer.wte.weight"])


def test_too_little_disk_space(zoo, tmp_path, capsys):
    """A real 2 MiB filesystem (tmpfs) as the output's parent: validate and merge refuse, writing nothing."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        raw = recipe_dict(zoo["gpt2"], zoo["llama"], small / "new" / "out")
        recipe = write(raw, tmp_path)
        # What the merge writes, counted from the real models: their parameters in float32 (tied ones once), an
        # SAE of 64 latents per source written twice (W_enc and W_dec, float32), and 10 MB for the rest.
        models = [AutoModelForCausalLM.from_pretrained(zoo[family]) for family in ("gpt2", "llama")]
        params = sum(p.numel() for model in models for p in model.parameters())
        need = params * 4 + 2 * 2 * (32 + 48) * 64 * 4 + 10e6
        free = shutil.disk_usage(small).free
        capsys.readouterr()
        for command in (["validate", str(recipe)], ["merge", str(recipe), "--quiet"]):
            assert main(command) == 2
            assert errors_of(capsys) == [
                f"output: the merge will write about {need / 1e6:.1f} MB to '{small / 'new' / 'out'}', which has "
                f"{free / 1e6:.1f} MB free; expected at least {need * 1.1 / 1e6:.1f} MB free"]
            assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_names_cannot_write_outside_the_output(zoo, tmp_path, capsys):
    raw = recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path / "out")
    raw["models"][0]["name"] = "../x"
    raw["models"][1]["layer"] = "../x"
    raw["merge"]["target"] = "../x"
    assert main(["validate", str(write(raw, tmp_path))]) == 2
    [line] = errors_of(capsys)  # the name is refused first (pydantic's wording in between is not pinned)
    assert line.startswith(f"{tmp_path / 'recipe.yaml'}: models.0.name: ") and line.endswith(" (got '../x')"), line
    raw["models"][0]["name"] = "a"
    raw["merge"]["target"] = "a"
    assert main(["validate", str(write(raw, tmp_path))]) == 2
    assert errors_of(capsys) == ["models.1.layer: no module '../x' in LlamaForCausalLM"]
    # The guard where SAE folders are made, for names that got that far (a model's own module names).
    assert inside(tmp_path, "saes", "a", "transformer.h.1") == tmp_path / "saes/a/transformer.h.1"
    for parts in (("saes", "..", "..", "x"), ("saes", "a", "/etc"), ("saes/../../x",)):
        with pytest.raises(RecipeError) as e:
            inside(tmp_path / "out", *parts)
        assert e.value.lines == [f"'{os.path.join(*parts)}' would be written outside '{tmp_path / 'out'}'; "
                                 "expected a path inside it"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
