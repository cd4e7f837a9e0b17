"""Distillation (`saemerge distill`): the KL terms, a merge that ends with a student, LoRA and smaller students,
the feature term, resume to the weights of an uninterrupted run, and one-line errors."""

import json
import os
import shutil
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from saemerge import parse_recipe
from saemerge.cli import main
from saemerge.distill import distill, kl_to_teacher, smaller, teacher_targets
from saemerge.evaluate import load_merged
from conftest import PROSE, recipe_dict
from hub_server import hub_server  # noqa: F401  (the fixture)

TOKENS = 8 * 256  # eight steps of 256 tokens


def distill_recipe(zoo, output, **distill_fields):
    raw = recipe_dict(zoo["gpt2_trained"], zoo["gpt2_b"], output, data__tokens=1024, merge__heads="router",
                      merge__calibrate={"steps": 2, "batch_tokens": 256})
    raw["distill"] = {"tokens": TOKENS, "batch_tokens": 256, "lr": 3e-3, "log_every": 2, **distill_fields}
    return raw


@pytest.fixture(scope="module")
def merged(zoo, tmp_path_factory):
    """A router merge of two tiny GPT-2s that ends with a distillation into its target (b), evaluated."""
    root = tmp_path_factory.mktemp("distill")
    tasks = root / "tasks"
    tasks.mkdir()
    task = yaml.safe_load((PROSE.parents[2] / "tasks/saemerge_prose.yaml").read_text())
    task.update(task="tiny_prose", dataset_kwargs={"data_files": {"test": str(PROSE)}})
    (tasks / "tiny_prose.yaml").write_text(yaml.safe_dump(task))
    raw = distill_recipe(zoo, root / "merged")
    raw["eval"] = {"tasks": ["tiny_prose"], "include_path": str(tasks), "limit": 2, "batch_size": 2}
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["merge", str(root / "recipe.yaml"), "--quiet"]) == 0
    return root


def held_out_kl(teacher, student, ids) -> float:
    with torch.no_grad():
        return kl_to_teacher(student(ids).logits, teacher_targets(teacher(ids).logits, 1.0, None), 1.0).mean().item()


def test_kl_terms_exact_at_full_vocabulary_and_never_above_the_full_kl():
    torch.manual_seed(0)
    teacher, student = torch.randn(3, 5, 50) * 3, torch.randn(3, 5, 50) * 3
    full = kl_to_teacher(student, teacher_targets(teacher, 2.0, None), 2.0)
    assert torch.allclose(kl_to_teacher(student, teacher_targets(teacher, 2.0, 50), 2.0), full, atol=1e-5)
    for k in (1, 5, 20):  # coarsening can only lose information: 0 <= KL_k <= KL (data processing inequality)
        coarse = kl_to_teacher(student, teacher_targets(teacher, 2.0, k), 2.0)
        assert (coarse >= -1e-6).all() and (coarse <= full + 1e-5).all()
    assert kl_to_teacher(teacher, teacher_targets(teacher, 2.0, 5), 2.0).abs().max() < 1e-5
    # A teacher sure of one token: the rest has no mass, and nothing becomes nan.
    sure = torch.full((1, 1, 50), -1e4)
    sure[..., 3] = 0
    assert torch.isfinite(kl_to_teacher(student[:1, :1], teacher_targets(sure, 1.0, 4), 1.0)).all()


def test_a_merge_ends_with_a_plain_student_closer_to_its_teacher(merged, zoo):
    student_dir = merged / "merged-distilled"
    config = json.loads((student_dir / "config.json").read_text())
    assert config["model_type"] == "gpt2" and "auto_map" not in config  # loads without saemerge
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher, tokenizer = load_merged(merged / "merged")
    ids = tokenizer(["def add(a, b):\n    return a + b\n\nThe house stood on a hill above the river."],
                    return_tensors="pt")["input_ids"]
    original = AutoModelForCausalLM.from_pretrained(zoo["gpt2_b"]).eval()
    assert held_out_kl(teacher, student, ids) < 0.8 * held_out_kl(teacher, original, ids)
    assert student.generate(ids[:, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)

    report = json.loads((student_dir / "distill.json").read_text())
    assert report["steps"] == 8 and report["tokens"] == TOKENS and report["top_k"] is None  # a small vocabulary
    held = report["held_out"]
    assert held["student_loss_after"] < held["student_loss_before"]
    log = [json.loads(line) for line in (student_dir / "distill_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 2, 4, 6, 8] and log[-1]["kd"] < log[1]["kd"]
    card = (student_dir / "README.md").read_text()
    assert "distilled with saemerge from the merged model `merged`" in card and "tiny_prose" in card
    assert "from_pretrained" in card and "distillation" in card
    assert (student_dir / "distill_curves.png").stat().st_size > 10_000
    assert json.loads((student_dir / "eval_results.json").read_text())["results"]["tiny_prose"]["bits_per_byte"] > 0
    assert not list(merged.glob(".*checkpoint*"))


def test_lora_student_is_folded_in_and_a_smaller_student_copies_its_first_blocks(merged, zoo, tmp_path, capsys):
    overrides = ["--set", "distill.lora={r: 4, alpha: 8}", "--set", "distill.tokens=512"]
    assert main(["distill", str(merged / "merged"), "--output", str(tmp_path / "lora"), "--no-eval", "--quiet",
                 *overrides]) == 0
    assert "held-out next-token loss: teacher" in capsys.readouterr().out
    keys = load_file(tmp_path / "lora/model.safetensors")
    assert not any("lora" in k for k in keys)
    original = load_file(zoo["gpt2_b"] / "model.safetensors")
    assert keys.keys() == original.keys() and keys["transformer.wte.weight"].equal(original["transformer.wte.weight"])
    changed = ~keys["transformer.h.0.attn.c_attn.weight"].isclose(original["transformer.h.0.attn.c_attn.weight"])
    assert changed.any()  # the adapter was trained and folded in
    report = json.loads((tmp_path / "lora/distill.json").read_text())
    assert 0 < report["trained_parameters"] < sum(v.numel() for v in original.values()) / 5

    source = AutoModelForCausalLM.from_pretrained(zoo["gpt2_b"])
    small = smaller(source, {"n_layer": 2}, seed=0)
    assert small.config.n_layer == 2
    assert small.transformer.h[1].mlp.c_fc.weight.equal(source.transformer.h[1].mlp.c_fc.weight)
    assert main(["distill", str(merged / "merged"), "--output", str(tmp_path / "small"), "--no-eval", "--quiet",
                 "--set", "distill.student_config={n_layer: 2}", "--set", "distill.tokens=512"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "small").config.n_layer == 2


def test_feature_term_pulls_the_students_code_toward_the_merged_code(merged, tmp_path):
    raw = yaml.safe_load((merged / "merged/recipe.yaml").read_text())
    raw["distill"].update(features=1.0, ce_weight=0.0, tokens=12 * 256, lr=3e-3)
    teacher, tokenizer = load_merged(merged / "merged")
    out = distill(teacher, parse_recipe(raw), tokenizer, tmp_path / "features", progress=False,
                  evaluate_after=False)
    log = [json.loads(line) for line in (out / "distill_log.jsonl").read_text().splitlines()][1:]
    assert log[-1]["features"] < log[0]["features"]


def test_resume_gives_the_weights_of_an_uninterrupted_run(merged, tmp_path):
    raw = yaml.safe_load((merged / "merged/recipe.yaml").read_text())
    raw["distill"].update(checkpoint_every=2)
    recipe = parse_recipe(raw)
    teacher, tokenizer = load_merged(merged / "merged")
    straight = distill(teacher, recipe, tokenizer, tmp_path / "straight", progress=False, evaluate_after=False)

    calls = []

    def interrupt(module, args):  # the 5th teacher call is step 4 (the first measures the held-out batch)
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    handle = teacher.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt, match="at step 4 of 8 of distillation"):
        distill(teacher, recipe, tokenizer, tmp_path / "resumed", progress=False, evaluate_after=False)
    handle.remove()
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.checkpoint/state.json").is_file()
    distill(teacher, recipe, tokenizer, tmp_path / "resumed", resume=True, progress=False, evaluate_after=False)
    a, b = load_file(straight / "model.safetensors"), load_file(tmp_path / "resumed/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    rows = lambda folder: [json.loads(line)["step"] for line in (folder / "distill_log.jsonl").read_text().splitlines()]
    assert rows(straight) == rows(tmp_path / "resumed")


@pytest.mark.parametrize("args, message", [
    (["--set", "distill.student=nowhere"], "distill.student: cannot load 'nowhere'"),
    (["--set", "distill.lora={r: 2}", "--set", "distill.student_config={n_layer: 1}"],
     "distill.lora: set with distill.student_config"),
    (["--set", "distill.student_config={n_embd: 64}", "--set", "distill.features=1"],
     "distill.features: the student is 64 wide"),
    (["--set", "distill.student_config={no_such_field: 1}"], "distill.student_config.no_such_field: not a field"),
    (["--set", "distill.temperature=0"], "distill.temperature: Input should be greater than 0"),
    (["--resume"], "--resume: no checkpoint"),
])
def test_bad_settings_are_one_line_errors_and_write_nothing(merged, zoo, tmp_path, capsys, args, message):
    assert main(["distill", str(merged / "merged"), "--output", str(tmp_path / "out"), "--quiet", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.checkpoint").exists()


def test_other_tokenizer_and_existing_output_are_refused(merged, zoo, tmp_path, capsys):
    assert main(["distill", str(merged / "merged"), "--output", str(tmp_path), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["distill", str(merged / "merged"), "--output", str(tmp_path / "o"), "--quiet",
                 "--set", f"distill.student={zoo['gpt2_other_tok']}"]) == 2
    assert "has another tokenizer" in capsys.readouterr().err
    assert main(["distill", str(tmp_path), "--quiet"]) == 2
    assert "no recipe.yaml" in capsys.readouterr().err


def test_merge_refuses_an_existing_student_folder_before_training(zoo, tmp_path, write_recipe, capsys):
    raw = distill_recipe(zoo, tmp_path / "out")
    (tmp_path / "out-distilled").mkdir()
    assert main(["merge", str(write_recipe(raw)), "--quiet"]) == 2
    assert "distill.output: " in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_student_folder_is_pushed_with_its_card(merged, tmp_path, hub_server, monkeypatch):
    import huggingface_hub.constants

    from saemerge.hub import push

    for key, value in (("ENDPOINT", hub_server.url), ("HF_HUB_DISABLE_XET", True), ("HF_HUB_DISABLE_TELEMETRY", True)):
        monkeypatch.setattr(huggingface_hub.constants, key, value)
    folder = shutil.copytree(merged / "merged-distilled", tmp_path / "student")
    push(folder, "user/student", token=hub_server.token)
    files = hub_server.repos["user/student"]["files"]
    assert {"model.safetensors", "config.json", "distill.json", "tokenizer.json"} <= set(files)
    card = files["README.md"].decode()
    assert 'from_pretrained("user/student")' in card and "distilled with saemerge" in card
