"""`saemerge push` and the model card, against the fake Hub of hub_server.py (no internet)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from huggingface_hub import ModelCard

from saemerge.card import is_generated, model_card
from saemerge.cli import main
from saemerge.hub import push
from conftest import REPO, make_model, recipe_dict
from hub_server import hub_server  # noqa: F401  (the fixture)


@pytest.fixture(scope="module")
def merged(tokenizer, tmp_path_factory):
    """A folder as `saemerge merge` writes it (tiny random GPT-2 into tiny random Llama, two training steps)."""
    root = tmp_path_factory.mktemp("hub")
    for family in ("gpt2", "llama"):
        make_model(family, len(tokenizer)).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(root / "gpt2", root / "llama", root / "out", data__tokens=1024)))
    assert main(["merge", str(recipe), "--quiet"]) == 0
    return root / "out"


@pytest.fixture
def folder(merged, tmp_path):
    """A copy each test may change."""
    return shutil.copytree(merged, tmp_path / "tiny-merge")


def files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_push_through_the_cli_uploads_every_file(folder, hub_server, tmp_path):
    """The user's path: `saemerge push` in a fresh process, token from HF_TOKEN, Hub from HF_ENDPOINT."""
    (folder / ".DS_Store").write_bytes(b"\0junk")
    (folder / "saes/.ipynb_checkpoints").mkdir()
    (folder / "saes/.ipynb_checkpoints/cfg.json").write_text("{}")
    (folder / "notes.tmp").write_text("scratch")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub_server.url, HF_TOKEN=hub_server.token, HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_XET="1",  # LFS through the git-lfs `basic` transfer; xet storage is not faked
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "saemerge", "push", str(folder), "user/tiny-merge", "--private"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"{hub_server.url}/user/tiny-merge" in run.stdout
    assert not hub_server.failed

    repo = hub_server.repos["user/tiny-merge"]
    assert repo["private"] and repo["commits"] == ["Upload model merged with saemerge"]
    local = {path: data for path, data in files(folder).items()
             if path not in (".DS_Store", "saes/.ipynb_checkpoints/cfg.json", "notes.tmp")}
    assert {"README.md", "config.json", "model.safetensors", "recipe.yaml", "training_curves.png"} <= set(local)
    assert {p: sha(d) for p, d in repo["files"].items()} == {p: sha(d) for p, d in local.items()}
    # (The fake Hub answers 401 to any API call without HF_TOKEN's token, so the push above used it.) The token
    # goes to the Hub only: the weights' uploads go to presigned storage URLs, a third party on the real Hub.
    uploads = [r for r in hub_server.requests if r.method == "PUT"]
    assert uploads and not any("authorization" in r.headers for r in uploads)

    # The card, rewritten at push time so that it names the repo.
    readme = repo["files"]["README.md"].decode()
    card = ModelCard(readme).data
    assert card.tags == ["saemerge", "merge", "sparse-autoencoder"]
    assert card.library_name == "transformers" and card.pipeline_tag == "text-generation"
    assert card.base_model is None  # the sources are local folders, which the Hub's model tree cannot link
    assert f"```yaml\n{(folder / 'recipe.yaml').read_text()}```" in readme
    assert 'AutoModelForCausalLM.from_pretrained("user/tiny-merge")' in readme


def test_model_card(folder):
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["models"][0]["model"] = "google/gemma-3-270m"
    recipe["models"][1]["adapter"] = "someone/gemma-code-lora"  # models[1].model stays a local folder
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (folder / "eval_results.json").write_text(json.dumps({"results": {"saemerge_code": {"bits_per_byte": 1.5}}}))
    text = model_card(folder)

    data = ModelCard(text).data
    assert data.base_model == ["google/gemma-3-270m", "someone/gemma-code-lora"]
    assert data.base_model_relation == "merge"
    assert data.tags == ["saemerge", "merge", "sparse-autoencoder"]
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert "- `a`: `google/gemma-3-270m`; layer `transformer.h.1`" in text
    assert "LoRA adapter `someone/gemma-code-lora` merged in; layer `model.layers.1`" in text
    assert "Merge: heads `target`, target `b`, combine `mean`, scale 1.0, gates none." in text
    assert f"```yaml\n{(folder / 'recipe.yaml').read_text()}```" in text
    assert "| a->b |" in text and "| saemerge_code | bits_per_byte | 1.5000 |" in text
    assert "import saemerge" in text and 'from_pretrained("tiny-merge")' in text
    assert is_generated(text) and not is_generated(text.replace("# tiny-merge", "# my merge"))
    # The merge wrote the card itself (before the eval file above existed).
    assert is_generated((folder / "README.md").read_text())


@pytest.fixture
def local_hub(hub_server, monkeypatch):
    """Point this process's huggingface_hub at the fake Hub (it reads HF_ENDPOINT and friends at import)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)  # no agent list cached in ~
    return hub_server


def test_an_edited_card_is_pushed_as_is_and_pushing_again_works(folder, local_hub):
    edited = (folder / "README.md").read_text().replace("# tiny-merge", "# tiny-merge, by hand")
    (folder / "README.md").write_text(edited)
    for message in ("first", "second"):  # the second create_repo gets 409 (exists) and goes on
        url = push(folder, "user/edited", token=local_hub.token, commit_message=message)
    assert url == f"{local_hub.url}/user/edited"
    repo = local_hub.repos["user/edited"]
    assert repo["files"]["README.md"].decode() == edited and not repo["private"]
    assert repo["commits"] == ["first", "second"] and not local_hub.failed


def test_errors_are_one_line_with_exit_code_2(folder, tmp_path, local_hub, capsys):
    (tmp_path / "not-a-model").mkdir()
    assert main(["push", str(tmp_path / "not-a-model"), "user/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not-a-model: not a merged or distilled model folder" in err

    # A wrong --token: the Hub's 401 becomes one line, and the token sent was the one given.
    assert main(["push", str(folder), "user/x", "--token", "hf_wrong"]) == 2
    err = capsys.readouterr().err
    assert err == "error: push to 'user/x': HTTP 401: Invalid credentials in Authorization header\n"
    assert {r.headers.get("authorization") for r in local_hub.requests} == {"Bearer hf_wrong"} and not local_hub.repos


def test_model_push_to_hub_uploads_weights_code_and_card(folder, local_hub):
    """`model.push_to_hub(repo)` from Python: saves into a temporary folder (sharded here), uploads it with the
    merge's card and files that came with from_pretrained, and what arrives loads back to the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    model.push_to_hub("user/from-python", token=local_hub.token, max_shard_size="100KB", private=True)
    repo = local_hub.repos["user/from-python"]
    assert repo["private"] and not local_hub.failed
    sent = set(repo["files"])
    assert {"config.json", "model.safetensors.index.json", "modeling.py", "hooks.py", "sae.py", "README.md",
            "recipe.yaml", "metrics.json"} <= sent and len([p for p in sent if p.startswith("model-0")]) >= 2
    card = repo["files"]["README.md"].decode()  # the merge's card, naming the repo it went to
    assert is_generated(card) and 'from_pretrained("user/from-python")' in card
    assert card.split("## Usage")[0] == (folder / "README.md").read_text().split("## Usage")[0]

    arrived = folder.parent / "arrived"
    for path, data in repo["files"].items():
        (arrived / path).parent.mkdir(parents=True, exist_ok=True)
        (arrived / path).write_bytes(data)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(arrived)(ids).logits, model(ids).logits)

    model.merge_files = {}  # as a model built in memory: no recipe, no metrics; the card comes from its config
    model.push_to_hub("user/in-memory", token=local_hub.token)
    card = local_hub.repos["user/in-memory"]["files"]["README.md"].decode()
    assert is_generated(card) and "## Recipe" not in card
    assert all(f"- `{name}`:" in card for name in model.config.names)
