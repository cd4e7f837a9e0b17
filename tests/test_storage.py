"""The saved folder: self-contained or by reference, sharded, and loadable where saemerge is not installed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from saemerge import merge, parse_recipe
from saemerge.cli import main
from conftest import recipe_dict

IDS = torch.randint(1, 300, (2, 16), generator=torch.Generator().manual_seed(1))

# Runs a folder's own code in a fresh interpreter in which `import saemerge` fails.
WITHOUT_SAEMERGE = """
import importlib.abc, json, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "saemerge":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Hide())
import torch
from transformers import AutoModelForCausalLM
folder, trust, ids = sys.argv[1], sys.argv[2] == "trust", torch.tensor(json.loads(sys.argv[3]))
try:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust)
except ValueError as e:
    print(json.dumps({"refused": str(e)}))
    sys.exit(0)
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"logits": logits.tolist(), "class": type(model).__module__, "saemerge": "saemerge" in sys.modules}))
"""


def without_saemerge(folder: Path, trust: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", WITHOUT_SAEMERGE, str(folder), "trust" if trust else "no",
                          json.dumps(IDS.tolist())], capture_output=True, text=True, cwd=folder.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folders(zoo, lora, tmp_path_factory):
    """One recipe (gpt2 -> llama + LoRA adapter) saved three ways; training is deterministic, so all three
    hold the same merged model."""
    root = tmp_path_factory.mktemp("storage")
    adapter, _ = lora
    out = {}
    for kind, save in [("self", {}), ("reference", {"storage": "reference"}),
                       ("sharded", {"max_shard_size": "100KB"})]:
        raw = recipe_dict(zoo["gpt2"], zoo["llama"], root / kind, data__tokens=1024, train__eval_tokens=256)
        raw["models"][1]["adapter"] = str(adapter)
        raw["save"] = save
        out[kind] = merge(parse_recipe(raw), progress=False, evaluate_after=False)
    return out


def logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder)(IDS).logits


def weight_names(folder: Path) -> set[str]:
    names = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names |= set(f.keys())
    return names


def test_the_three_folders_hold_the_same_model(folders):
    reference = logits(folders["self"])
    assert torch.equal(logits(folders["reference"]), reference)
    assert torch.equal(logits(folders["sharded"]), reference)


def test_reference_folder_keeps_sources_out(folders, zoo, lora):
    names = weight_names(folders["reference"])
    assert names and not any(n.startswith("sources.") for n in names)
    assert any(n.startswith("saes.") for n in names)
    assert any(n.startswith("sources.") for n in weight_names(folders["self"]))
    config = json.loads((folders["reference"] / "config.json").read_text())
    refs = {s["name"]: s["reference"] for s in config["sources"]}
    assert refs["a"]["model"] == str(Path(zoo["gpt2"]).resolve())
    assert refs["b"]["adapter"] == str(Path(lora[0]).resolve())
    size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert size(folders["reference"]) < 0.5 * size(folders["self"])


def test_dtype_reaches_sources_stored_by_reference(folders):
    expected = logits(folders["self"]).log_softmax(-1)
    model = AutoModelForCausalLM.from_pretrained(folders["reference"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        got = model(IDS).logits.float().log_softmax(-1)
    assert (got - expected).abs().max() < 0.05


def test_large_folders_are_sharded_with_an_index(folders):
    folder = folders["sharded"]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == weight_names(folder)


@pytest.mark.parametrize("kind", ["self", "reference"])
def test_loads_without_saemerge_with_trust_remote_code(folders, kind):
    folder = folders[kind]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration.SAEMergedConfig",
                                  "AutoModelForCausalLM": "modeling.SAEMergedForCausalLM"}
    code = {"modeling.py", "configuration.py", "cache.py", "wiring.py", "sae_bridge.py", "linear_bridge.py",
            "cross_attention_bridge.py", "pretrained.py", "hooks.py", "sae.py", "retokenize.py", "heads.py", "lockstep.py"}
    assert {p.name for p in folder.glob("*.py")} == code  # the model's modules and nothing of the pipeline
    result = without_saemerge(folder, trust=True)
    assert not result["saemerge"]  # the folder's own code ran: saemerge could not be imported
    assert torch.equal(torch.tensor(result["logits"]), logits(folders["self"]))


def test_without_saemerge_and_without_trust_remote_code_transformers_refuses(folders):
    result = without_saemerge(folders["self"], trust=False)
    assert "trust_remote_code=True" in result["refused"]


def test_merge_files_travel_with_the_model(folders, tmp_path):
    """recipe.yaml, metrics.json and report.md come back with from_pretrained and go out with save_pretrained."""
    model = AutoModelForCausalLM.from_pretrained(folders["self"])
    assert {"recipe.yaml", "metrics.json", "report.md"} <= set(model.merge_files)
    model.save_pretrained(tmp_path / "copy")
    for name in model.merge_files:
        assert (tmp_path / "copy" / name).read_text() == (folders["self"] / name).read_text()


def test_bad_save_settings_are_one_line_each(zoo, tmp_path, write_recipe):
    raw = recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path / "out")
    raw["save"] = {"storage": "elsewhere", "max_shard_size": "5 gigabytes"}
    path = write_recipe(raw)
    result = subprocess.run([sys.executable, "-m", "saemerge", "validate", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines
    assert "save.storage: " in lines[0] and "save.max_shard_size: " in lines[1], lines


def test_a_missing_reference_is_named(folders, tmp_path):
    import shutil

    folder = shutil.copytree(folders["reference"], tmp_path / "moved")
    config = json.loads((folder / "config.json").read_text())
    config["sources"][0]["reference"]["model"] = str(tmp_path / "gone")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match=r"stored by reference and its source 'a' \(.*gone\) cannot be loaded"):
        AutoModelForCausalLM.from_pretrained(folder)
