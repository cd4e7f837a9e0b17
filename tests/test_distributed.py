"""Data-parallel training: `accelerate launch` with two CPU processes (gloo) against one process."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml
import torch
from safetensors.torch import load_file

from saemerge.cli import main
from conftest import REPO, recipe_dict

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "saemerge"]


def launcher_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}


def launch(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(LAUNCH + args, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300,
                          **kwargs)


def tiny_recipe(zoo, output, **train):
    raw = recipe_dict(zoo["gpt2"], zoo["llama"], output, data__tokens=12 * 512, train__eval_tokens=256)
    raw["latent"].update(size=2048, k=4)  # many latents die: resampling is exercised
    raw["train"].update(shuffle_batches=1, resample_every=3, **train)
    return raw


def test_two_processes_train_what_one_process_trains(zoo, tmp_path):
    """Same global batches (each process harvests half of every batch): the gradients summed across processes
    are the single-process gradients, so after 12 steps with data initialisation, dead-latent resampling and
    the alignment loss every weight agrees to 1e-4 (float32 sums in another order, magnified by Adam where gradients are
    near zero; weights are ~0.1-1) and the metrics, measured on the same held-back tokens, to 1e-3."""
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(yaml.safe_dump(tiny_recipe(zoo, tmp_path / "one")))
    two.write_text(yaml.safe_dump(tiny_recipe(zoo, tmp_path / "two")))
    assert main(["merge", str(one), "--quiet", "--no-eval"]) == 0
    result = launch(["merge", str(two), "--quiet", "--no-eval"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("merged model written to") == 1  # the first process reports, the other is silent

    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-4, key
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert ma["resampled_latents"] == mb["resampled_latents"] > 0
    for name in ("a", "b"):
        ev_a = ma["sites"][0]["sources"][name]["explained_variance"]
        assert abs(ev_a - mb["sites"][0]["sources"][name]["explained_variance"]) < 1e-3
    assert not (tmp_path / ".two.checkpoint").exists()


def test_a_batch_the_processes_cannot_share_is_refused(zoo, tmp_path):
    raw = tiny_recipe(zoo, tmp_path / "out", batch_tokens=15 * 32)  # 15 sequences for 2 processes
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    result = launch(["merge", str(tmp_path / "r.yaml"), "--quiet", "--no-eval"])
    assert result.returncode != 0
    assert "train.batch_tokens: 15 sequences per step cannot be shared by 2 processes; expected a multiple of 64" \
        in result.stderr
    # The launcher (torchrun) prints its own traceback when a process fails; none of ours.
    assert not [line for line in result.stderr.splitlines() if line.startswith("  File") and "saemerge" in line]
    assert not (tmp_path / "out").exists()


def test_two_processes_stopped_by_sigterm_resume_to_the_uninterrupted_weights(zoo, tmp_path):
    """SIGTERM to the launcher reaches both processes: they stop at the same step, process 0 checkpoints, and
    `--resume` with two processes ends bit-equal to an uninterrupted two-process run."""
    for name in ("straight", "stopped"):
        raw = tiny_recipe(zoo, tmp_path / name, checkpoint_every=4)
        raw["data"]["tokens"] = 40 * 512
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    assert launch(["merge", str(tmp_path / "straight.yaml"), "--quiet", "--no-eval"]).returncode == 0

    proc = subprocess.Popen(LAUNCH + ["merge", str(tmp_path / "stopped.yaml"), "--quiet", "--no-eval"], cwd=REPO,
                            env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / ".stopped.checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["step"] >= 8:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stops = [line for line in err.splitlines() if line.startswith("interrupted: SIGTERM at step")]
    assert len(stops) == 2 and stops[0] == stops[1], err[-2000:]  # both processes, the same step
    assert not (tmp_path / "stopped").exists()

    result = launch(["merge", str(tmp_path / "stopped.yaml"), "--quiet", "--no-eval", "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "stopped" / "model.safetensors")
    assert a and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
