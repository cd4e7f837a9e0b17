"""Two sources of different width and depth that share one tokenizer (a GPT-2 of width 128 and 2 blocks, one of
width 256 and 4 blocks), merged through the whole product path: `saemerge merge` with an lm-eval task, the folder
loaded back with the Auto class, generation with and without the KV cache, `saemerge eval` on the folder."""

import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from saemerge import build_merged, load_source, parse_recipe, train_from_recipe, validate
from saemerge.cli import main
from conftest import PROMPTS, PROSE, recipe_dict, texts, train_briefly

WIDTHS = {"small": 128, "big": 256}
DEPTHS = {"small": 2, "big": 4}
IDS = torch.randint(1, 400, (2, 20), generator=torch.Generator().manual_seed(2))

# (case id, target, layers per source): one site (block 0 of the small one with block 2 of the big one) into
# either target, and two sites ([0, 1] with [1, 3]) into the big one.
CASES = {
    "into_big": ("big", {"small": 0, "big": 2}),
    "into_small": ("small", {"small": 0, "big": 2}),
    "two_sites": ("big", {"small": [0, 1], "big": [1, 3]}),
}


@pytest.fixture(scope="module")
def sizes(tokenizer, tmp_path_factory):
    """{"small": folder, "big": folder}: briefly trained GPT-2s of different width and depth, one tokenizer."""
    root = tmp_path_factory.mktemp("sizes")
    held_out = torch.tensor(tokenizer("\n".join(texts(PROSE)[10:12]))["input_ids"][:128])[None]  # not trained on
    folders = {}
    for seed, name in enumerate(WIDTHS):
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=WIDTHS[name], n_layer=DEPTHS[name], n_head=4,
                            n_positions=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        torch.manual_seed(seed)
        model = train_briefly(AutoModelForCausalLM.from_config(config), tokenizer, steps=30)
        with torch.no_grad():  # better than chance (ln 400 = 5.99 nats) on text it did not see
            assert model(held_out, labels=held_out).loss < math.log(len(tokenizer)) - 0.5, name
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    task = yaml.safe_load((PROSE.parents[2] / "tasks/saemerge_prose.yaml").read_text())
    task.update(task="tiny_prose", dataset_kwargs={"data_files": {"test": str(PROSE)}})
    (folder / "tiny_prose.yaml").write_text(yaml.safe_dump(task))
    return folder


def raw_recipe(sizes, tasks, output, case):
    target, layers = CASES[case]
    raw = recipe_dict(sizes["small"], sizes["big"], output, data__tokens=1024, train__eval_tokens=512,
                      merge__target=target)
    raw["models"] = [{"name": name, "model": str(sizes[name]), "layer": layers[name]} for name in WIDTHS]
    raw["eval"] = {"tasks": ["tiny_prose"], "include_path": str(tasks), "limit": 2, "batch_size": 2}
    return raw


@pytest.fixture(scope="module", params=list(CASES))
def merged(request, sizes, tasks, tmp_path_factory):
    """(case, folder written by `saemerge merge`, the same recipe built in memory)."""
    case = request.param
    root = tmp_path_factory.mktemp(case)
    raw = raw_recipe(sizes, tasks, root / "out", case)
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["merge", str(root / "recipe.yaml"), "--quiet"]) == 0

    recipe = parse_recipe({**raw, "output": str(root / "memory")})
    paths = validate(recipe)
    sources = {s.name: load_source(s) for s in recipe.models}
    saes, _ = train_from_recipe(recipe, sources, paths, AutoTokenizer.from_pretrained(sizes["small"]), progress=False)
    return case, root / "out", build_merged(recipe, sources, saes, paths).eval()


def test_the_folder_records_each_source_width_and_its_own_layers(merged):
    case, folder, _ = merged
    _, layers = CASES[case]
    config = json.loads((folder / "config.json").read_text())
    sources = {s["name"]: s for s in config["sources"]}
    assert set(sources) == {"small", "big"}
    for name, width in WIDTHS.items():
        wanted = [f"transformer.h.{i}" for i in (layers[name] if isinstance(layers[name], list) else [layers[name]])]
        assert sources[name]["d_model"] == width
        assert sources[name]["config"]["n_embd"] == width and sources[name]["config"]["n_layer"] == DEPTHS[name]
        assert sources[name]["layers"] == wanted
        for path in wanted:
            cfg = json.loads((folder / "saes" / name / path / "cfg.json").read_text())
            assert cfg["d_in"] == width, (name, path)
            assert cfg["d_sae"] == 64, (name, path)  # one latent size for every source
            assert (folder / "saes" / name / path / "sae.safetensors").is_file()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [site["layers"] for site in metrics["sites"]] == [
        {"small": a, "big": b} for a, b in zip(sources["small"]["layers"], sources["big"]["layers"])]


def test_the_loaded_folder_gives_the_in_memory_logits_over_the_target_vocabulary(merged, tokenizer):
    case, folder, model = merged
    target, _ = CASES[case]
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert loaded.config.target == target
    assert {n: m.config.n_embd for n, m in loaded.sources.items()} == WIDTHS
    with torch.no_grad():
        expected, got = model(IDS).logits, loaded(IDS).logits
    assert got.shape == (2, 20, len(tokenizer)) == (2, 20, loaded.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_merge_changes_the_target_and_scale_zero_is_the_target(merged, sizes):
    """Features really cross widths: scale 1 moves the target's logits, scale 0 gives them back exactly."""
    case, folder, _ = merged
    target, _ = CASES[case]
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    alone = AutoModelForCausalLM.from_pretrained(sizes[target]).eval()
    with torch.no_grad():
        merged_logits = loaded(IDS).logits
        reference = alone(IDS).logits
        loaded.config.scale = 0.0
        silent = loaded(IDS).logits
    torch.testing.assert_close(silent, reference, rtol=0, atol=1e-5)
    assert (merged_logits - reference).abs().mean() > 1e-2, case  # measured: 0.03 (into big) .. 1.3 (into small)
    assert (merged_logits.argmax(-1) != reference.argmax(-1)).any(), case  # measured: about half the positions


def test_greedy_with_cache_equals_greedy_without(merged):
    _, folder, _ = merged
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(**batch, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = loaded.generate(**kwargs, use_cache=True)
    recomputed = loaded.generate(**kwargs, use_cache=False)
    assert cached.shape == (len(PROMPTS), batch["input_ids"].shape[1] + 8)
    assert torch.equal(cached, recomputed)


def test_eval_results_and_saemerge_eval_agree(merged, tasks, tmp_path, capsys):
    _, folder, _ = merged
    saved = json.loads((folder / "eval_results.json").read_text())["results"]["tiny_prose"]
    assert saved["bits_per_byte"] > 0
    capsys.readouterr()
    assert main(["eval", str(folder), "--tasks", "tiny_prose", "--include-path", str(tasks), "--limit", "2",
                 "--batch-size", "2", "--output", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["results"]["tiny_prose"]
    assert abs(again["bits_per_byte"] - saved["bits_per_byte"]) < 1e-6
    assert "| tiny_prose | bits_per_byte |" in capsys.readouterr().out
