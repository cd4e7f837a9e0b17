"""The composition benchmark's recipe (recipes/composition-linear-receiver.yaml) end to end on tiny sources: the
task's data written as JSONL, `saemerge merge` calibrating on the answers only (`prompt_column`), score.py."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
COMPOSITION = REPO / "eval" / "composition"
sys.path.insert(0, str(COMPOSITION))
from data import Task  # noqa: E402


def run(*command):
    return subprocess.run([str(c) for c in command], check=True, capture_output=True, text=True, cwd=REPO).stdout


def test_composition_recipe_merges_and_scores(tmp_path):
    task = ["--keys", "40"]
    run(sys.executable, COMPOSITION / "train_models.py", "K", "S", *task, "--steps", '{"K": 3, "S": 3}',
        "--width", "32", "--rows", "8", "--output", tmp_path)
    run(sys.executable, COMPOSITION / "write_data.py", *task, "--rows", "300", "--output", tmp_path / "data")
    held_out = set(Task(40).split_keys["test"])
    compositions = [json.loads(line) for line in (tmp_path / "data" / "compositions.jsonl").read_text().splitlines()]
    assert compositions and not any(set(c["prompt"].split()) & held_out for c in compositions)
    merged = tmp_path / "merged"
    sets = {"models.0.model": tmp_path / "K", "models.1.model": tmp_path / "S", "data.tokens": 4096,
            "data.datasets.0.data_files": tmp_path / "data" / "sources.jsonl",
            "merge.calibrate.datasets.0.data_files": tmp_path / "data" / "compositions.jsonl",
            "merge.calibrate.steps": 3, "latent.size": 64, "latent.k": 8}
    run(sys.executable, "-m", "saemerge", "merge", REPO / "recipes" / "composition-linear-receiver.yaml", "--output", merged, "--quiet",
        *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    calibration = json.loads((merged / "metrics.json").read_text())["calibration"]
    assert calibration["steps"] == 3
    # The receiver (S) was trained (calibrate.receiver): its block 0 moved.
    weights, source = load_file(merged / "model.safetensors"), load_file(tmp_path / "S" / "model.safetensors")
    moved = [k for k in weights if k.startswith("sources.S.") and k.endswith("h.0.attn.c_attn.weight")]
    assert moved and not torch.equal(weights[moved[0]], source[moved[0].removeprefix("sources.S.")])
    scores = json.loads(run(sys.executable, COMPOSITION / "score.py", merged, *task, "--eval-examples", "8"))
    assert set(scores) == {"model", "held-out", "seen"} and 0 <= scores["held-out"] <= 1
