"""A real lm-evaluation-harness run of a local perplexity task on a merged model."""

import json

import yaml

from saemerge.cli import main
from conftest import PROSE, recipe_dict


def test_local_perplexity_task_on_a_merged_model(zoo, tmp_path, write_recipe, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = yaml.safe_load((PROSE.parents[2] / "tasks/saemerge_prose.yaml").read_text())
    task.update(task="tiny_prose", dataset_kwargs={"data_files": {"test": str(PROSE)}})
    (tasks / "tiny_prose.yaml").write_text(yaml.safe_dump(task))

    raw = recipe_dict(zoo["gpt2"], zoo["gpt2_b"], tmp_path / "out", data__tokens=1024)
    raw["eval"] = {"tasks": ["tiny_prose"], "include_path": str(tasks), "limit": 2, "batch_size": 2}
    assert main(["merge", str(write_recipe(raw)), "--quiet"]) == 0
    merged = json.loads((tmp_path / "out/eval_results.json").read_text())["results"]["tiny_prose"]
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(merged)  # the task's metric_list
    assert merged["bits_per_byte"] > 0
    assert "tiny_prose" in (tmp_path / "out/report.md").read_text()

    # The same task through `saemerge eval` on the saved folder gives the same numbers.
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--tasks", "tiny_prose", "--include-path", str(tasks),
                 "--limit", "2", "--batch-size", "2", "--output", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["results"]["tiny_prose"]
    assert abs(again["bits_per_byte"] - merged["bits_per_byte"]) < 1e-6
    assert "| tiny_prose | bits_per_byte |" in capsys.readouterr().out

    # In bfloat16: the same numbers to within half a percent, and the results say which dtype gave them.
    assert main(["eval", str(tmp_path / "out"), "--tasks", "tiny_prose", "--include-path", str(tasks),
                 "--limit", "2", "--batch-size", "2", "--dtype", "bfloat16", "--output", str(tmp_path / "bf16.json")]) == 0
    half = json.loads((tmp_path / "bf16.json").read_text())
    assert half["config"]["dtype"] == "torch.bfloat16"
    assert abs(half["results"]["tiny_prose"]["bits_per_byte"] / merged["bits_per_byte"] - 1) < 0.005


def test_unknown_task_is_a_clear_error(zoo, tmp_path, capsys):
    raw_dir = tmp_path / "m"
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(zoo["gpt2"]).save_pretrained(raw_dir)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(zoo["gpt2"]).save_pretrained(raw_dir)
    assert main(["eval", str(raw_dir), "--tasks", "no_such_task"]) == 2
    assert "eval.tasks: unknown task(s) ['no_such_task']" in capsys.readouterr().err


def test_committed_sample_tasks_and_max_length(zoo, tmp_path, monkeypatch):
    """The *_sample tasks (process_docs in eval/tasks/sample.py) load and run; max_length sets the windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saemerge import evaluate
    from conftest import REPO

    monkeypatch.chdir(REPO)  # the task YAMLs name their data relative to the repository root
    model, tokenizer = AutoModelForCausalLM.from_pretrained(zoo["gpt2"]).eval(), AutoTokenizer.from_pretrained(zoo["gpt2"])
    scores = {n: evaluate(model, tokenizer, ["saemerge_prose_sample"], REPO / "eval/tasks", limit=2, batch_size=4,
                          max_length=n, output=tmp_path / f"{n}.json")["saemerge_prose_sample"]["bits_per_byte"]
              for n in (8, 64)}
    assert json.loads((tmp_path / "8.json").read_text())["config"]["max_length"] == 8
    assert scores[8] > 0 and scores[8] != scores[64]


def test_a_cross_attention_merge_calibrates_saves_and_evaluates(zoo, tmp_path, write_recipe, capsys):
    """merge.bridge through the whole pipeline: the bridge is trained by calibration, saved, and lm-eval scores
    the folder again to the same number."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = yaml.safe_load((PROSE.parents[2] / "tasks/saemerge_prose.yaml").read_text())
    task.update(task="tiny_prose", dataset_kwargs={"data_files": {"test": str(PROSE)}})
    (tasks / "tiny_prose.yaml").write_text(yaml.safe_dump(task))
    raw = recipe_dict(zoo["gpt2"], zoo["gpt2_b"], tmp_path / "out", data__tokens=1024, merge__heads="router",
                      merge__bridge="cross_attention", merge__calibrate={"steps": 3, "batch_tokens": 256})
    raw["eval"] = {"tasks": ["tiny_prose"], "include_path": str(tasks), "limit": 2, "batch_size": 2}
    assert main(["merge", str(write_recipe(raw)), "--quiet"]) == 0
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["bridge"] == "cross_attention"
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())["calibration"]
    assert metrics["steps"] == 3 and metrics["held_back_loss_after"] != metrics["held_back_loss_before"]
    merged = json.loads((tmp_path / "out/eval_results.json").read_text())["results"]["tiny_prose"]
    assert main(["eval", str(tmp_path / "out"), "--tasks", "tiny_prose", "--include-path", str(tasks),
                 "--limit", "2", "--batch-size", "2", "--output", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["results"]["tiny_prose"]
    assert abs(again["bits_per_byte"] - merged["bits_per_byte"]) < 1e-6
