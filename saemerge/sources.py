"""Loading the source models a recipe names, and the checks that need them (layers, tokenizers)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .hooks import resolve_layer
from .recipe import Recipe, RecipeError, SourceSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(setting: str) -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _load_kwargs(spec: SourceSpec) -> dict:
    kwargs = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    return kwargs


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_tokenizer(spec: SourceSpec):
    return AutoTokenizer.from_pretrained(spec.model, **_load_kwargs(spec))


def load_source(spec: SourceSpec, device: str | torch.device = "cpu") -> PreTrainedModel:
    """A frozen source in eval mode. Weights come from safetensors (or GGUF), never from pickles."""
    kwargs = _load_kwargs(spec)
    if not spec.gguf_file:
        kwargs["use_safetensors"] = True
    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=DTYPES[spec.dtype], **kwargs)
    model.requires_grad_(False)
    return model.eval().to(device)


def _tokenizers_match(a, b) -> bool:
    probe = "Hello, world!\n    def f(x):\n        return x ** 2  # ünïcödé 123"
    return a.get_vocab() == b.get_vocab() and a(probe)["input_ids"] == b(probe)["input_ids"]


def check_sources(recipe: Recipe) -> dict:
    """Check what needs the models' configs and tokenizers; return {name: module paths of its layers}.

    Cheap: reads configs and tokenizers, and builds each architecture on the meta device (no weights).
    Raises RecipeError with every problem found.
    """
    errors, paths, tokenizers = [], {}, {}
    for i, spec in enumerate(recipe.models):
        where = f"models.{i}"
        local = Path(spec.model)
        if (spec.model.startswith((".", "/")) or spec.gguf_file) and not local.exists():
            errors.append(f"{where}.model: folder '{spec.model}' does not exist")
            continue
        if spec.gguf_file and not (local / spec.gguf_file).is_file():
            errors.append(f"{where}.gguf_file: '{local / spec.gguf_file}' does not exist")
            continue
        try:
            config = AutoConfig.from_pretrained(spec.model, **_load_kwargs(spec))
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
        except Exception as e:  # any loader failure becomes one line naming the source
            errors.append(f"{where}.model: cannot load '{spec.model}' as a causal LM: {_one_line(e)}")
            continue
        try:
            paths[spec.name] = [resolve_layer(skeleton, layer) for layer in spec.layers]
        except ValueError as e:
            errors.append(f"{where}.layer: {e}")
        try:
            tokenizers[spec.name] = load_tokenizer(spec)
        except Exception as e:
            errors.append(f"{where}.model: cannot load the tokenizer of '{spec.model}': {_one_line(e)}")
    names = list(tokenizers)
    for name in names[1:]:
        if not _tokenizers_match(tokenizers[names[0]], tokenizers[name]):
            i = [s.name for s in recipe.models].index(name)
            errors.append(f"models.{i}.model: tokenizer of '{name}' differs from that of '{names[0]}'; "
                          "expected sources that share one tokenizer")
    if errors:
        raise RecipeError(errors)
    return paths
