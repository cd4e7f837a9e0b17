"""Push a merged model folder to the Hugging Face Hub, with its model card."""

from __future__ import annotations

from pathlib import Path

from .card import is_generated, write_model_card
from .recipe import RecipeError

# Hidden files and folders (.DS_Store, .ipynb_checkpoints, ...) and editor or temporary leftovers stay local.
IGNORE = [".*", "*/.*", "*.tmp", "*~"]


def push(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         commit_message: str = "Upload model merged with saemerge") -> str:
    """Create `repo_id` (if needed) and upload the folder; return the repo's URL.
    The token is `token`, else huggingface_hub's own: the HF_TOKEN variable, else `hf auth login`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "recipe.yaml").is_file():
        raise RecipeError(f"{folder}: not a merged model folder; expected config.json and recipe.yaml inside "
                          "(written by `saemerge merge`)")
    readme = folder / "README.md"
    # (Re)write the card unless it was edited by hand: it then names the repo and has the latest eval results.
    if not readme.is_file() or is_generated(readme.read_text()):
        write_model_card(folder, repo_id)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, ignore_patterns=IGNORE)
    except HfHubHTTPError as e:
        detail = (e.server_message or str(e)).strip().splitlines()[0]
        raise RecipeError(f"push to '{repo_id}': HTTP {e.response.status_code}: {detail}") from e
    return str(url)
