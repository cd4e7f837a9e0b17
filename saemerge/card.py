"""The model card (README.md) of a merged folder, built from the files the merge wrote."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from .evaluate import results_table
from .files import write_atomic
from .report import sae_table

TAGS = ["saemerge", "merge", "sparse-autoencoder"]
# The last line of a generated card hashes the rest, so that `saemerge push` can tell it was not edited since.
MARK = "<!-- saemerge model card {} -->"


def hub_ids(models: list[dict]) -> list[str]:
    """The sources and adapters that are Hub ids, in order, once each. Local folders are left out: the Hub's
    model tree (base_model) only understands repo ids."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    ids = []
    for spec in models:
        for name in (spec.get("model"), spec.get("adapter")):
            if not name or Path(name).exists() or name in ids:
                continue
            try:
                validate_repo_id(name)
            except HFValidationError:
                continue  # a path that does not exist here, e.g. relative to another folder
            ids.append(name)
    return ids


def source_line(spec: dict, layers: list[str]) -> str:
    line = f"- `{spec['name']}`: `{spec['model']}`"
    if spec.get("revision"):
        line += f" (revision `{spec['revision']}`)"
    if spec.get("gguf_file"):
        line += f", GGUF file `{spec['gguf_file']}`"
    if spec.get("adapter"):
        line += f", LoRA adapter `{spec['adapter']}` merged in"
    return line + f"; layer{'s' if len(layers) > 1 else ''} " + ", ".join(f"`{p}`" for p in layers)


def recipe_of_config(config: dict, name: str) -> dict:
    """What the card needs of a recipe, from a merged model's config.json (a model built in memory, not by
    `saemerge merge`, has no recipe.yaml)."""
    latent = config.get("latent", {})
    return {"name": name,
            "models": [{"name": s["name"], **s.get("reference", {"model": s["name"]}), "layer": s["layers"]}
                       for s in config["sources"]],
            "latent": {"size": latent.get("d_sae"), "activation": latent.get("activation"), "k": latent.get("k")},
            "merge": {key: config.get(key) for key in ("heads", "target", "combine", "scale", "gates")},
            "save": {"storage": config.get("storage")}}


def model_card(folder: str | Path, repo_id: str | None = None) -> str:
    """README.md for a merged folder: Hub metadata, what was merged and how, the recipe, the SAE metrics, the
    evaluation (if any) and how to load it. `repo_id` goes into the loading snippet (default: the folder name)."""
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    if (folder / "distill.json").is_file():
        return student_card(folder, repo_id)
    config = json.loads((folder / "config.json").read_text())
    recipe_text = (folder / "recipe.yaml").read_text() if (folder / "recipe.yaml").is_file() else None
    recipe = yaml.safe_load(recipe_text) if recipe_text else recipe_of_config(config, folder.name)
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    sites = metrics.get("sites", [])
    base_model = hub_ids(recipe["models"])
    data = ModelCardData(base_model=base_model or None, base_model_relation="merge" if base_model else None,
                         tags=TAGS, library_name="transformers", pipeline_tag="text-generation")

    m, latent = recipe["merge"], recipe["latent"]
    sparsity = f"TopK, k {latent['k']}" if latent["activation"] == "topk" else \
        f"ReLU, L1 {latent['l1']}" if latent.get("l1") is not None else "ReLU"
    settings = (f"heads `{m['heads']}`, target `{m['target']}`, combine `{m['combine']}`, scale {m['scale']}, "
                f"gates {', '.join(m['gates']) or 'none'}")
    calibration = metrics.get("calibration")
    if calibration:
        settings += (f"; gates and router calibrated for {calibration['steps']} steps (held-back next-token loss "
                     f"{calibration['held_back_loss_before']:.4f} -> {calibration['held_back_loss_after']:.4f})")
    text = [
        f"# {recipe['name']}",
        "",
        f"A merge of {len(recipe['models'])} causal language models made with saemerge: each source has a sparse "
        "autoencoder (SAE) on its residual stream, all SAEs share one latent space, and features are carried "
        "between the sources through it. The sources run side by side on the same tokens.",
        "",
        "Sources:",
        "",
        *(source_line(spec, [site["layers"][spec["name"]] for site in sites] or [str(spec["layer"])])
          for spec in recipe["models"]),
        "",
        f"Latent space: {latent['size']} latents ({sparsity})"
        + (f", trained on {metrics['train_tokens']:,} tokens." if metrics.get("train_tokens") else "."),
        f"Merge: {settings}.",
    ]
    if recipe.get("save", {}).get("storage") == "reference":
        text.append("The sources' weights are not in this repository: loading fetches them from the sources above.")
    text += ["", "## Usage", "", "```python", "import saemerge  # registers the architecture with transformers",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("{repo_id or folder.name}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{repo_id or folder.name}")', "```", ""]
    if "auto_map" in config:  # the modeling code travels with the weights
        text += ["Without saemerge installed, pass `trust_remote_code=True` to `from_pretrained` (it runs the "
                 "modeling code stored in this repository).", ""]
    if recipe_text:
        text += ["## Recipe", "", "```yaml", recipe_text.rstrip("\n"), "```", ""]
    if sites:
        text += ["## Sparse autoencoders", "",
                 f"Measured on {sites[0]['tokens']:,} held-back tokens. Explained variance of each SAE on its own "
                 "source; cross explained variance: source B's activation reconstructed from source A's code.", ""]
        for site in sites:
            if len(sites) > 1:
                text += ["Layers: " + ", ".join(f"{name} `{path}`" for name, path in site["layers"].items()), ""]
            text += [sae_table(site), ""]
    if (folder / "training_curves.png").is_file():
        text += ["![training curves](training_curves.png)", ""]
    if (folder / "eval_results.json").is_file():
        results = json.loads((folder / "eval_results.json").read_text())["results"]
        text += ["## Evaluation (lm-evaluation-harness)", "", results_table(results), ""]
    card = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(text)
    return f"{card}\n{MARK.format(digest(card))}\n"


def student_card(folder: Path, repo_id: str | None = None) -> str:
    """README.md for a distilled folder (`saemerge distill`): the teacher, its sources, how the student was
    trained, its held-out loss beside the teacher's, and how to load it (plain transformers)."""
    from huggingface_hub import ModelCardData

    recipe_text = (folder / "recipe.yaml").read_text()
    recipe, metrics = yaml.safe_load(recipe_text), json.loads((folder / "distill.json").read_text())
    spec = recipe.get("distill") or {}
    base_model = hub_ids([m for m in recipe["models"] if m["name"] == metrics["student"]]) or None
    data = ModelCardData(base_model=base_model, base_model_relation="finetune" if base_model else None,
                         tags=[*TAGS, "distillation"], library_name="transformers", pipeline_tag="text-generation")
    held = metrics["held_out"]
    how = "a LoRA adapter (folded into the weights)" if spec.get("lora") else "all its weights"
    if spec.get("student_config"):
        how += f" of a smaller config ({', '.join(f'{k} {v}' for k, v in spec['student_config'].items())})"
    text = [
        f"# {folder.name if repo_id is None else repo_id.split('/')[-1]}",
        "",
        f"A single model distilled with saemerge from the merged model `{metrics['teacher']}`, which runs "
        f"{len(recipe['models'])} sources side by side with features carried between them through sparse "
        "autoencoders sharing one latent space. This student runs at the cost of one model.",
        "",
        "Teacher's sources:",
        "",
        *(source_line(m, [str(m["layer"])]) for m in recipe["models"]),
        "",
        f"Student: `{metrics['student']}`, trained in {how} on {metrics['tokens']:,} tokens "
        f"({metrics['steps']} steps): (1 - {spec.get('ce_weight', 0.5)}) x T^2 x KL to the teacher at temperature "
        f"{spec.get('temperature', 2.0)}"
        + (f" (the teacher's top {metrics['top_k']} tokens and the rest)" if metrics.get("top_k") else "")
        + f" + {spec.get('ce_weight', 0.5)} x next-token loss"
        + (f" + {spec['features']} x feature term (the merged SAE code)" if spec.get("features") else "") + ".",
        "",
        f"Held-out next-token loss ({held['tokens']:,} tokens of the training mixture): teacher "
        f"{held['teacher_loss']:.4f}, student {held['student_loss_before']:.4f} before and "
        f"{held['student_loss_after']:.4f} after.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id or folder.name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id or folder.name}")',
        "```",
        "",
    ]
    if (folder / "distill_curves.png").is_file():
        text += ["![distillation curves](distill_curves.png)", ""]
    if (folder / "eval_results.json").is_file():
        results = json.loads((folder / "eval_results.json").read_text())["results"]
        text += ["## Evaluation (lm-evaluation-harness)", "", results_table(results), ""]
    text += ["## Recipe", "", "```yaml", recipe_text.rstrip("\n"), "```", ""]
    card = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(text)
    return f"{card}\n{MARK.format(digest(card))}\n"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_generated(readme: str) -> bool:
    """True if `readme` is a card written by model_card and not edited since."""
    card, _, last = readme.rstrip("\n").rpartition("\n")
    return last == MARK.format(digest(card))


def write_model_card(folder: str | Path, repo_id: str | None = None) -> Path:
    return write_atomic(Path(folder) / "README.md", model_card(folder, repo_id))
