"""Push a merged model folder to the Hugging Face Hub, with its model card."""

from __future__ import annotations

import json
from pathlib import Path

from .card import is_generated, write_model_card
from .errors import HubError, UserError

# Hidden files and folders (.DS_Store, .ipynb_checkpoints, ...) and editor or temporary leftovers stay local.
IGNORE = [".*", "*/.*", "*.tmp", "*~"]


def push(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         commit_message: str = "Upload model merged with saemerge", revision: str | None = None,
         create_pr: bool = False) -> str:
    """Create `repo_id` (if needed) and upload a merged model's folder (written by `saemerge merge` or
    `save_pretrained`) with its model card; return the repo's URL. `model.push_to_hub` comes here too.
    The token is `token`, else huggingface_hub's own: the HF_TOKEN variable, else `hf auth login`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if model_type(folder / "config.json") != "saemerge" and not (folder / "distill.json").is_file():
        raise UserError(f"{folder}: not a merged or distilled model folder; expected the config.json of a saemerge "
                        "model (written by `saemerge merge` or save_pretrained) or a `saemerge distill` folder")
    readme = folder / "README.md"
    # (Re)write the card unless it was edited by hand: it then names the repo and has the latest eval results.
    if not readme.is_file() or is_generated(readme.read_text()):
        write_model_card(folder, repo_id)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, ignore_patterns=IGNORE,
                          revision=revision, create_pr=create_pr)
    except HfHubHTTPError as e:
        detail = (e.server_message or str(e)).strip().splitlines()[0]
        raise HubError(f"push to '{repo_id}': HTTP {e.response.status_code}: {detail}") from e
    return str(url)


def model_type(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):  # missing, unreadable, not JSON, not an object
        return None
