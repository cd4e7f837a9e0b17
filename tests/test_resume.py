"""Interrupted runs: checkpoints, --resume to exactly the weights of an uninterrupted run, divergence."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from saemerge.cli import main
from conftest import REPO, recipe_dict

STEPS = 24  # data.tokens / batch_tokens: long enough to be stopped in the middle


def tiny_recipe(zoo, output, **train):
    raw = recipe_dict(zoo["gpt2"], zoo["llama"], output, data__tokens=STEPS * 512, train__eval_tokens=256,
                      merge__heads="router", merge__gates=["latent"],
                      merge__calibrate={"steps": 3, "batch_tokens": 256})
    raw["train"].update(checkpoint_every=4, resample_every=5, **train)
    return raw


def weights(folder):
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(zoo, root / "out")))
    assert main(["merge", str(path), "--quiet", "--no-eval"]) == 0
    return root / "out"


def run_until_checkpoint(recipe_path, checkpoint, min_step: int, sig) -> subprocess.CompletedProcess:
    """Start a merge in a fresh process and send it `sig` once its checkpoint has passed `min_step`."""
    proc = subprocess.Popen([sys.executable, "-m", "saemerge", "merge", str(recipe_path), "--quiet", "--no-eval"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        state = checkpoint / "state.json"
        try:
            if json.loads(state.read_text())["step"] >= min_step:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_resume_gives_the_weights_of_an_uninterrupted_run(zoo, tmp_path, uninterrupted, sig):
    """SIGTERM: checkpoint at the step it stops; SIGKILL: the last periodic checkpoint. Either way, --resume
    replays the data stream and random state and ends bit-equal to the uninterrupted run (SAEs, gates, router)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(zoo, tmp_path / "out")))
    checkpoint = tmp_path / ".out.checkpoint"
    stopped = run_until_checkpoint(path, checkpoint, 8, sig)
    assert not (tmp_path / "out").exists()
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    assert 8 <= step < STEPS
    if sig == signal.SIGTERM:
        assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
        assert f"SIGTERM at step {step} of {STEPS}; checkpoint in" in stopped.stderr and "--resume" in stopped.stderr

    assert main(["merge", str(path), "--quiet", "--no-eval"]) == 2  # a checkpoint is there: resume or overwrite
    assert main(["merge", str(path), "--quiet", "--no-eval", "--resume"]) == 0
    assert not checkpoint.exists()
    resumed, straight = weights(tmp_path / "out"), weights(uninterrupted)
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert resumed[key].equal(straight[key]), key
    log = [json.loads(line)["step"] for line in (tmp_path / "out/training_log.jsonl").read_text().splitlines()]
    assert log == sorted(set(log)) and log[-1] == STEPS - 1  # one line per logged step, none twice


def test_resume_refuses_other_settings_and_a_missing_checkpoint(zoo, tmp_path, write_recipe, capsys):
    raw = tiny_recipe(zoo, tmp_path / "out")
    assert main(["merge", str(write_recipe(raw)), "--quiet", "--no-eval", "--resume"]) == 2
    assert "--resume: no checkpoint at" in capsys.readouterr().err
    raw["train"]["lr"] = 1e30  # diverges at once: stops, keeps nothing but the checkpoint
    assert main(["merge", str(write_recipe(raw)), "--quiet", "--no-eval"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "train: the loss became nan at step 1" in err[0] and "lower train.lr and run again" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.checkpoint").exists()


def test_divergence_names_the_step_and_the_last_good_checkpoint(zoo, tmp_path, write_recipe, capsys):
    """A run stopped after a checkpoint is resumed with an exploding learning rate: it stops at a non-finite
    loss naming the step and that checkpoint, which still holds finite weights; resumed again with a sane
    learning rate, it finishes."""
    raw = tiny_recipe(zoo, tmp_path / "out")
    path = write_recipe(raw)
    checkpoint = tmp_path / ".out.checkpoint"
    assert run_until_checkpoint(path, checkpoint, 4, signal.SIGTERM).returncode == 130
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    # No regular checkpoint while exploding: one written after a step at lr 1e10 holds finite but ruined weights
    # (a stop just before a checkpoint_every step made this test flaky).
    raw["train"].update(lr=1e10, checkpoint_every=0)
    assert main(["merge", str(write_recipe(raw)), "--quiet", "--no-eval", "--resume"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "train: the loss became nan at step" in err[0]
    assert f"'{checkpoint}' (after step {step}), with --resume" in err[0]
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == step and not (tmp_path / "out").exists()
    assert all(t.isfinite().all() for k, t in load_file(checkpoint / state["tensors"]).items() if k.startswith("sae."))
    raw["latent"]["size"] = 32
    assert main(["merge", str(write_recipe(raw)), "--quiet", "--no-eval", "--resume"]) == 2
    assert "other settings (latent.size)" in capsys.readouterr().err
    raw["latent"]["size"] = 64
    raw["train"]["lr"] = 3e-3
    assert main(["merge", str(write_recipe(raw)), "--quiet", "--no-eval", "--resume"]) == 0
    assert all(t.isfinite().all() for t in weights(tmp_path / "out").values())
