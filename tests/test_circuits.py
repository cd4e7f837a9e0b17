"""`saemerge circuit`: behaviours and circuit search on features, on a tiny GPT-2 trained for a few seconds on
code-like lines where the closing bracket follows from the token before it (a digit closes "(", a letter "["),
with SAEs of its own at five sites; the component baseline also on the tiny random Llama."""

import json
import random

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from saemerge.behaviours import Behaviour, bracket_behaviour, load_behaviour, metric
from saemerge.circuits import (ComponentAblation, FeatureAblation, acdc_search, attention_projection, component_search,
                               find_circuit)
from saemerge.cli import main
from saemerge.dictionaries import load_dictionaries, train_dictionaries
from saemerge.feature_intervention import mean_codes, run_features
from saemerge.recipe import SAERecipe, parse_recipe

from conftest import BLOCK_PATHS, SITES, make_model


def code_line(rng: random.Random) -> str:
    name = rng.choice(["a", "b", "x", "y", "n", "data", "value", "key"])
    if rng.random() < 0.5:
        return f"{name} = {rng.choice(['f', 'len', 'max'])}({rng.choice('0123456789')})"
    return f"{name} = {rng.choice(['a', 'b', 'x'])}[{rng.choice('ijkmn')}]"


@pytest.fixture(scope="module")
def brackets(tokenizer, tmp_path_factory):
    """(dictionaries folder, code file): a GPT-2 trained 60 steps on the lines, SAEs (64 latents, k 8) on them."""
    root = tmp_path_factory.mktemp("brackets")
    rng = random.Random(0)
    texts = ["\n".join(code_line(rng) for _ in range(40)) for _ in range(30)]
    data = root / "code.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    ids = torch.tensor(tokenizer("\n".join(texts))["input_ids"])
    model, generator = make_model("gpt2", len(tokenizer), seed=7), torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        batch = torch.stack([ids[s:s + 64] for s in torch.randint(0, len(ids) - 64, (16,), generator=generator)])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    raw = {"name": "brackets", "models": [{"name": "m", "model": str(root / "model"), "layer": SITES["gpt2"]}],
           "latent": {"size": 64, "k": 8},
           "data": {"datasets": [{"path": "json", "data_files": str(data)}], "seq_len": 32, "tokens": 8192,
                    "shuffle_buffer": 8},
           "train": {"batch_tokens": 512, "lr": 3e-3, "eval_tokens": 1024}, "output": str(root / "dicts")}
    return train_dictionaries(parse_recipe(raw, schema=SAERecipe), progress=False), data


@pytest.fixture(scope="module")
def setup(brackets, tokenizer):
    """The model, its dictionaries, 32 bracket prompts in one batch, and the features' ablation on them."""
    folder, data = brackets
    dicts = load_dictionaries(folder)
    model = AutoModelForCausalLM.from_pretrained(dicts.spec.model).eval().requires_grad_(False)
    for sae in dicts.saes:
        sae.requires_grad_(False)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    batches = bracket_behaviour(texts, tokenizer, 32, window=8).batches()
    means = mean_codes(model, dicts, [(b.ids, b.mask) for b in batches])
    return model, dicts, batches, FeatureAblation(model, dicts, batches, means)


@pytest.fixture(scope="module")
def report(brackets, tmp_path_factory):
    folder, data = brackets
    output = tmp_path_factory.mktemp("circuit") / "out"
    return find_circuit(folder, "brackets", data=data, prompts=64, window=8, methods="attribution,acdc",
                        tau=0.0, output=output, progress=False), output


def test_bracket_prompts_end_before_the_matching_closer(tokenizer):
    text = "y = f(a[1]) + g(b)\nw = (q]\nv = h(" + " a" * 30 + ")"
    behaviour = bracket_behaviour([text], tokenizer, 10, window=6)
    close, square = (tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in ")]")
    # "(q]" closes the wrong bracket, and the last ")" one opened 30 tokens back: neither makes a prompt.
    assert sorted(zip(behaviour.texts, behaviour.correct)) == [(" + g(b", close), (" = f(a[1", square),
                                                               (" f(a[1]", close)]
    for prompt, good, bad in zip(behaviour.prompts, behaviour.correct, behaviour.incorrect):
        assert len(prompt) == 6 and {good, bad} == {close, square}
        assert tokenizer.decode(prompt + [good]) in text  # the true continuation


def test_all_features_is_the_model_and_none_is_the_floor(setup):
    model, _, batches, ablation = setup
    clean = metric(model, batches)
    assert clean > 0.5  # the model does the behaviour
    everything = torch.ones(sum(ablation.sizes), dtype=torch.bool)
    active = torch.cat(ablation.means) > 0
    assert ablation.metric(everything) == clean == ablation.metric()
    assert ablation.metric(active) == clean  # never-active features ablated at every site: a no-op, exactly
    empty = ablation.metric(~everything)
    assert empty < clean - 0.2
    assert (ablation.metric(everything) - empty) / (clean - empty) == 1.0
    assert (ablation.metric(~everything) - empty) / (clean - empty) == 0.0


def test_fast_ablation_matches_run_features(setup):
    model, dicts, batches, ablation = setup
    keep = torch.rand(sum(ablation.sizes), generator=torch.Generator().manual_seed(0)) < 0.5
    per_site = keep.split(ablation.sizes)
    b = batches[0]
    edit = lambda site, z: torch.where(per_site[site], z, ablation.means[site])
    logits = run_features(model, dicts, b.ids, b.mask, edit=edit, logits_to_keep=b.last).output.logits
    assert ablation.metric(keep) == pytest.approx(float(b.logit_difference(logits).mean()), abs=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
def test_padded_batches_give_each_prompts_own_last_logits(family, zoo):
    """Right padding and `logits_to_keep` with one position per row: the logit difference of each prompt alone."""
    model = AutoModelForCausalLM.from_pretrained(zoo[family]).eval()
    prompts = [[5, 9, 31, 7], [5, 12], [5, 40, 41, 42, 43, 44], [5, 3, 3]]
    behaviour = Behaviour("t", prompts, [10, 11, 12, 13], [20, 21, 22, 23], ["a", "b", "c", "d"])
    batches = behaviour.batches(batch_size=3)
    assert [len(b.ids) for b in batches] == [3, 1] and batches[0].mask.sum() < batches[0].mask.numel()
    with torch.no_grad():
        alone = [model(torch.tensor([p])).logits[0, -1] for p in prompts]
    expected = sum(float(a[c] - a[i]) for a, c, i in zip(alone, behaviour.correct, behaviour.incorrect)) / 4
    assert metric(model, batches) == pytest.approx(expected, abs=1e-4)


def test_attribution_circuit_is_small_faithful_and_beats_random(report):
    r, _ = report
    a = r["methods"]["attribution"]
    assert r["m_full"] > r["m_empty"]
    assert a["faithfulness"] >= 0.8 and a["size"] < r["active_features"] < r["features"]
    assert a["random_same_size"]["faithfulness"] < a["faithfulness"] - 0.3
    assert len(a["nodes"]) == a["size"] and all(site in r["sites"] for site, _ in a["nodes"])
    assert a["curve"][0][0] == 1 and a["seconds"] > 0


def test_acdc_with_tau_zero_keeps_the_metric_exactly(report):
    r, _ = report
    acdc = r["methods"]["acdc"]
    assert acdc["finished"] and acdc["visited"] == r["active_features"]
    assert acdc["faithfulness"] == 1.0 and acdc["size"] <= r["active_features"]


def test_acdc_stops_at_its_time_budget(setup):
    ablation = setup[-1]
    active = torch.cat(ablation.means) > 0
    full, empty = ablation.metric(), ablation.metric(torch.zeros_like(active))
    stopped = acdc_search(ablation, full, empty, active, tau=1.0, max_seconds=1e-9, progress=False)
    assert not stopped["finished"] and stopped["visited"] <= 1
    assert stopped["keep"].sum() >= active.sum() - 1  # what it did not visit stays in


def test_outputs(report):
    r, output = report
    assert json.loads((output / "circuit.json").read_text())["m_full"] == r["m_full"]
    assert "greedy attribution" in (output / "circuit.md").read_text()
    assert Image.open(output / "circuit.png").size[0] > 300


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_component_pruning(family, setup, zoo):
    _, _, batches, _ = setup
    model = AutoModelForCausalLM.from_pretrained(zoo["gpt2_trained" if family == "gpt2" else family]).eval()
    blocks = model.get_submodule(BLOCK_PATHS[family])
    projection = blocks[0].attn.c_proj if family == "gpt2" else blocks[0].self_attn.o_proj
    assert attention_projection(blocks[0]) is projection
    ablation = ComponentAblation(model, batches)
    everything = torch.ones(ablation.total, dtype=torch.bool)
    assert ablation.metric(everything) == metric(model, batches)
    one_head = everything.clone()
    one_head[0] = False
    assert ablation.metric(one_head) != ablation.metric(everything)  # the pre-hook reaches the head
    pruned = component_search(model, batches, batches, tau=0.0, progress=False)
    assert pruned["finished"] and pruned["metric"] == pruned["m_full"]
    assert len(pruned["keep"]) == 3 * (model.config.num_attention_heads + 1)


@pytest.mark.parametrize("family", ["gemma3_text", "gpt_neox", "qwen2"])
def test_attention_projection_is_found(family, zoo):
    model = AutoModelForCausalLM.from_pretrained(zoo[family])
    block = model.get_submodule(BLOCK_PATHS[family])[1]
    name = next(n for n, m in block.named_modules() if m is attention_projection(block))
    expected = {"gemma3_text": "self_attn.o_proj", "gpt_neox": "attention.dense", "qwen2": "self_attn.o_proj"}
    assert name == expected[family]


def test_jsonl_behaviour(tokenizer, tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"prompt": "x = f(1", "correct": ")", "incorrect": "]"}\n\n'
                    '{"prompt": "y = a[i", "correct": "]", "incorrect": ")"}\n')
    b = load_behaviour(path, tokenizer, bos=[0])
    assert len(b) == 2 and b.prompts[0][0] == 0 and b.texts == ["x = f(1", "y = a[i"]
    search, held = b.split(seed=1)
    assert len(search) == len(held) == 1 and {search.texts[0], held.texts[0]} == set(b.texts)


def test_cli_end_to_end(brackets, tmp_path, capsys):
    folder, data = brackets
    out = tmp_path / "out"
    args = ["circuit", str(folder), "--behaviour", "brackets", "--data", str(data), "--prompts", "32",
            "--window", "8", "--methods", "attribution,components", "--output", str(out), "--quiet"]
    assert main(args) == 0
    assert "ACDC-style (heads + MLPs)" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"circuit.json", "circuit.md", "circuit.png"}
    assert main(args) == 2 and "exists" in capsys.readouterr().err


@pytest.mark.parametrize("lines, methods, expected", [
    (None, "attribution", "is not a file"),
    (['{"prompt": "x = f(1", "correct": ")", "incorrect": "]"}', "not json"], "attribution", "line 2: not JSON"),
    (['{"prompt": "x = f(1", "correct": ") + 1", "incorrect": "]"}'], "attribution", "exactly one token"),
    (['{"prompt": "x = f(1", "correct": ")"}'], "attribution", "expected an object with prompt"),
    (['{"prompt": "x", "correct": ")", "incorrect": "]"}'] * 4, "attribution,greedy", "--methods: greedy"),
    ("brackets", "attribution", "--data: missing"),
])
def test_errors_are_one_line(brackets, tmp_path, capsys, lines, methods, expected):
    folder, _ = brackets
    path = tmp_path / "behaviour.jsonl"
    if lines == "brackets":
        path = "brackets"
    elif lines is not None:
        path.write_text("\n".join(lines))
    assert main(["circuit", str(folder), "--behaviour", str(path), "--methods", methods, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
