"""A merge killed (SIGKILL) at any moment while saving leaves its output absent or complete, never half written;
with --overwrite, the old complete folder or the new one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import yaml
from transformers import AutoModelForCausalLM

import saemerge  # noqa: F401  registers the merged architecture
from saemerge.card import is_generated
from saemerge.cli import main
from conftest import recipe_dict

IDS = torch.randint(1, 300, (2, 8), generator=torch.Generator().manual_seed(0))
# Everything a finished merge writes (eval_results.json only with --eval tasks).
COMPLETE = {"config.json", "model.safetensors", "modeling.py", "tokenizer.json", "tokenizer_config.json", "recipe.yaml",
            "metrics.json", "training_log.jsonl", "training_curves.png", "report.md", "README.md", "saes"}
# One torch thread per run: two runs share the two cores.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def state(output) -> str:
    """'absent', 'old' or 'new': the folder at `output` must be absent or complete and load to finite logits."""
    if not output.exists():
        return "absent"
    names = {p.name for p in output.iterdir()}
    assert COMPLETE <= names, f"{output} is missing {COMPLETE - names}"
    assert (output / "saes/a/transformer.h.1/sae.safetensors").is_file()
    assert (output / "saes/b/model.layers.1/cfg.json").is_file()
    json.loads((output / "metrics.json").read_text())
    assert is_generated((output / "README.md").read_text())  # not cut short
    model = AutoModelForCausalLM.from_pretrained(output)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    return "old" if (output / "old.txt").exists() else "new"


def beside(output) -> list[str]:
    """What lies beside the output folder other than it; only hidden leftovers are allowed."""
    return [p.name for p in output.parent.iterdir() if p != output]


def run_and_kill(recipe, output, when: str, delay: float = 0.0, *args) -> str:
    """Start `saemerge merge` and SIGKILL it `delay` s after the hidden temporary folder appears (when='tmp'),
    once the output exists (when='output') or once the old output has been swapped out (when='swapped');
    polling every ~1 ms. Returns how the run ended."""
    proc = subprocess.Popen([sys.executable, "-m", "saemerge", "merge", str(recipe), "--no-eval", "--quiet", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    ready = {"tmp": lambda: any(n.startswith(f".{output.name}.tmp-") for n in beside(output)),
             "output": output.exists,
             "swapped": lambda: output.exists() and not (output / "old.txt").exists()}[when]
    while not ready() and proc.poll() is None:
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL), stderr.decode()[-2000:]
    return "finished" if proc.returncode == 0 else "killed"


def test_a_kill_while_saving_leaves_the_output_absent_or_complete(zoo, tmp_path):
    raw = lambda output: recipe_dict(zoo["gpt2"], zoo["llama"], output, data__tokens=1024)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw(tmp_path / "done")))
    assert main(["merge", str(tmp_path / "recipe.yaml"), "--no-eval", "--quiet"]) == 0  # a finished run
    assert state(tmp_path / "done") == "new" and beside(tmp_path / "done") == ["recipe.yaml"]  # no leftovers

    def scenario(i, when, delay=0.0, overwrite=False):
        output = tmp_path / f"run{i}" / "out"
        output.parent.mkdir()
        recipe = tmp_path / f"recipe{i}.yaml"
        recipe.write_text(yaml.safe_dump(raw(output)))
        if overwrite:  # an existing complete output, marked as the old one
            shutil.copytree(tmp_path / "done", output)
            (output / "old.txt").write_text("old")
        return output, run_and_kill(recipe, output, when, delay, *(["--overwrite"] if overwrite else []))

    plans = [("tmp", d) for d in (0, 0.005, 0.02, 0.05, 0.1, 0.2)] + [("output", 0)]
    plans = [(p, False) for p in plans] + [(("tmp", 0), True), (("swapped", 0), True)]
    with ThreadPoolExecutor(2) as pool:  # two runs side by side: the kill points move, the assertions do not
        runs = list(pool.map(lambda a: scenario(a[0], *a[1][0], overwrite=a[1][1]), enumerate(plans)))

    seen = []
    for (output, ended), (_, overwrite) in zip(runs, plans):
        got = state(output)
        if got == "absent" and overwrite:  # only without renameat2, killed between its two renames
            (old,) = output.parent.glob(".out.old-*")
            got = state(old) + " aside"
        assert got in (("old", "new", "old aside") if overwrite else ("absent", "new"))
        assert all(name.startswith(".") for name in beside(output)), beside(output)
        seen.append(got)
    print("states seen:", seen, "runs that finished before their kill:", [e for _, e in runs].count("finished"))
    # The first kills land long before the rename (saving takes far more than a millisecond), the ones after
    # the output appeared or was swapped, after it; the rest vary with the machine's speed.
    assert seen[0] == "absent" and seen[6] == "new" and seen[7] == "old" and seen[8] == "new"


def test_an_existing_output_is_kept_without_overwrite(zoo, tmp_path, write_recipe, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "mine.txt").write_text("keep")
    recipe = write_recipe(recipe_dict(zoo["gpt2"], zoo["llama"], output, data__tokens=1024))
    assert main(["merge", str(recipe), "--no-eval", "--quiet"]) == 2
    assert f"output: '{output}' already exists; expected a new folder (or pass --overwrite)" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["mine.txt"] and beside(output) == ["recipe.yaml"]


def test_output_appearing_during_the_merge_is_not_replaced(zoo, tmp_path, write_recipe, monkeypatch, capsys):
    """validate checks before training; whatever another process writes there meanwhile is kept too."""
    merge = sys.modules["saemerge.pipeline"]
    output = tmp_path / "out"
    train = merge.train_from_recipe

    def train_then_occupy(*args, **kwargs):
        result = train(*args, **kwargs)
        output.mkdir()
        return result

    monkeypatch.setattr(merge, "train_from_recipe", train_then_occupy)
    recipe = write_recipe(recipe_dict(zoo["gpt2"], zoo["llama"], output, data__tokens=1024))
    assert main(["merge", str(recipe), "--no-eval", "--quiet"]) == 2
    assert f"output: '{output}' appeared while merging" in capsys.readouterr().err
    assert list(output.iterdir()) == [] and all(n.startswith(".") for n in beside(output) if n != "recipe.yaml")


def test_overwrite_without_renameat2(tmp_path, monkeypatch):
    """Where renameat2 is missing (not Linux, some filesystems): the old folder is renamed aside, then deleted."""
    from saemerge import files

    monkeypatch.setattr(files, "_renameat2", lambda *args: False)
    for name, text in (("out", "old"), (".new", "new")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.txt").write_text(text)
    files.move_into_place(tmp_path / ".new", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out/a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]
