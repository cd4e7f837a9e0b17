"""The composition benchmark's real-model case (eval/composition/copy_task.py) on a byte-level BPE tokenizer like a
pretrained S's: held-out keys are composed nowhere, K never sees the copy sentence, answers tokenise as they do in
context, and the scripts run end to end with K narrower than S (a tiny random llama stands in for SmolLM2)."""

import json
import subprocess
import sys
from pathlib import Path

COMPOSITION = Path(__file__).resolve().parent.parent / "eval" / "composition"
sys.path.insert(0, str(COMPOSITION))
from copy_task import COPY, CopyTask  # noqa: E402
from data import batches, encode, stream  # noqa: E402


def test_copy_task_streams_and_answers(zoo):
    task = CopyTask(zoo["llama"], n_keys=60, seed=1)
    tok = task.tokenizer()
    take = lambda kind: [e for _, e in zip(range(1500), stream(task, kind, 0))]
    sentences = [t.split(" {a}")[0] for t in COPY]
    knowledge, skill, composed = take("knowledge"), take("skill"), take("composition")
    assert not any(s in e.text for e in knowledge for s in sentences)  # K never sees the skill
    assert {e.key for e in knowledge} == set(task.keys)  # ... and learns every key, held-out ones included
    assert any(e.prompt.count(".") > 1 for e in knowledge)  # keys stand after other statements too
    assert not any(k in e.text.split() for e in skill for k in task.keys)  # S never sees a key
    assert {e.key for e in composed} <= set(task.split_keys["train"])
    for e in composed + skill:
        prompt, answer = encode(e, tok)
        assert tok.decode(answer) == f" {int(e.answer)} ." and e.answer == str(task.values.get(e.key, e.answer))
        assert len(prompt) + len(answer) <= task.seq_len
    ids, labels = next(batches(task, "composition", tok, 0))
    assert ids.shape == labels.shape == (task.rows, task.seq_len)


def test_real_model_case_runs_end_to_end(zoo, tmp_path):
    run = lambda script, *args: subprocess.run([sys.executable, str(COMPOSITION / script), *args], check=True,
                                               capture_output=True, text=True)
    common = ["--skill-model", str(zoo["llama"]), "--keys", "40"]
    run("train_models.py", "K", *common, "--steps", '{"K": 3}', "--rows", "8", "--width", "32",
        "--output", str(tmp_path))
    log = json.loads((tmp_path / "K" / "train_log.json").read_text())
    assert set(log["skills"]) == {"recall", "copy"} and log["tokens"] == 3 * 8 * CopyTask(zoo["llama"], 40).seq_len
    output = tmp_path / "result.json"
    run("benchmark.py", *common, "--runs", str(tmp_path), "--output", str(output), "--k-layers", "1",
        "--s-layers", "0", "--receiver-steps", "2", "--eval-examples", "8", "--speed-repeats", "1",
        "--rows", "K alone", "S alone", "linear, receiver", "--quiet")
    result = json.loads(output.read_text())
    rows = {r["row"].split(" (")[0]: r for r in result["rows"]}
    assert set(rows) == {"K alone", "S alone", "bridge linear, receiver trained too"}
    assert set(result["sources"]) == {"K", "S"} and 0 <= result["sources"]["S"]["skills"]["copy"] <= 1
    assert result["task"]["kind"] == "copy" and result["layers"] == {"K": ["transformer.h.1"], "S": ["model.layers.0"]}
    bridge = rows["bridge linear, receiver trained too"]
    assert bridge["training"]["steps"] == 2 and bridge["trained_parameters"] > 0
    assert all(0 <= r[split] <= 1 for r in rows.values() for split in ("held-out", "seen"))
    assert output.with_suffix(".png").stat().st_size > 0
