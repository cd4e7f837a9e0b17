"""Loading the source models a recipe names, and the checks that need them (layers, tokenizers)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .hooks import find_blocks, resolve_layer
from .modeling import load_pretrained_source
from .recipe import LatentSpec, Recipe, RecipeError, SourceSpec


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
    return _tokenizer(spec.model, spec.revision, spec.gguf_file, spec.trust_remote_code)


@lru_cache(maxsize=8)
def _tokenizer(model: str, revision: str | None, gguf_file: str | None, trust_remote_code: bool):
    # Building a tokenizer from a GGUF file takes tens of seconds: once per file and run.
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(model, **{k: v for k, v in kwargs.items() if v is not None})


def load_source(spec: SourceSpec, device: str | torch.device = "cpu") -> PreTrainedModel:
    """A frozen source in eval mode, its adapter merged in. Weights come from safetensors or GGUF, never pickles."""
    model = load_pretrained_source(**reference(spec), device_map=spec.device_map)
    return model if spec.device_map else model.to(device)


def reference(spec: SourceSpec) -> dict:
    """How to load the source again later (the arguments of `load_pretrained_source`); local paths made absolute."""
    local = lambda path: str(Path(path).resolve()) if path and Path(path).exists() else path
    return {"model": local(spec.model), "revision": spec.revision, "gguf_file": spec.gguf_file,
            "adapter": local(spec.adapter), "dtype": spec.dtype, "trust_remote_code": spec.trust_remote_code}


def check_adapter(spec: SourceSpec, skeleton: PreTrainedModel) -> str | None:
    """Why the LoRA adapter cannot apply to this base (None if it can): files, method and every module shape."""
    from peft import PeftConfig
    from safetensors import safe_open

    folder = Path(spec.adapter)
    if not folder.is_dir():
        if spec.adapter.startswith((".", "/")) or folder.suffix:
            return f"folder '{spec.adapter}' does not exist"
        return None  # a hub id: checked when it is fetched
    weights = folder / "adapter_model.safetensors"
    if not (folder / "adapter_config.json").is_file() or not weights.is_file():
        pickled = [p.name for p in folder.glob("adapter_model.bin")]
        return (f"'{folder}' holds {pickled} (a pickle); expected adapter_config.json and adapter_model.safetensors"
                if pickled else f"'{folder}' is not a PEFT adapter; expected adapter_config.json and adapter_model.safetensors")
    try:
        config = PeftConfig.from_pretrained(folder)
    except Exception as e:
        return f"unreadable adapter_config.json: {_one_line(e)}"
    if config.peft_type != "LORA":
        return f"is a {config.peft_type} adapter; expected LoRA"
    with safe_open(weights, "pt") as f:
        for key in f.keys():
            if not key.endswith(("lora_A.weight", "lora_B.weight")):
                continue
            path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            try:
                module = skeleton.get_submodule(path)
            except AttributeError:
                return f"adapts '{path}', which '{spec.model}' does not have: an adapter for another base"
            shape = f.get_slice(key).get_shape()
            expected = module.in_features if key.endswith("lora_A.weight") else module.out_features
            found = shape[1] if key.endswith("lora_A.weight") else shape[0]
            if found != expected:
                return (f"'{path}' has {found} features in the adapter and {expected} in '{spec.model}': "
                        "an adapter for another base")
    return None


def check_sae_files(spec: SourceSpec, where: str, skeleton: PreTrainedModel, paths: list[str],
                    latent: LatentSpec) -> list[str]:
    """The source's `sae:` folders must hold SAEs of its layers' widths with the recipe's latent size, activation
    and k (the merged model builds every SAE from `latent`)."""
    from .interchange import import_sae

    errors = []
    kind = lambda activation, k: f"topk (k {k})" if activation == "topk" else activation
    blocks, _ = find_blocks(skeleton)
    for j, (folder, path) in enumerate(zip(spec.sae_folders, paths)):
        at = f"{where}.sae" + (f".{j}" if isinstance(spec.sae, list) else "")
        if not Path(folder).is_dir():
            errors.append(f"{at}: folder '{folder}' does not exist")
            continue
        try:
            cfg = import_sae(folder).cfg
        except Exception as e:  # any reader failure becomes one line naming the folder
            errors.append(f"{at}: cannot import '{folder}': {_one_line(e)}")
            continue
        # Block outputs have the hidden size, linear layers their out_features (GPT-2's Conv1D: nf); other
        # modules are checked once activations exist.
        module = skeleton.get_submodule(path)
        width = (skeleton.config.get_text_config().hidden_size if path.rpartition(".")[0] == blocks
                 else getattr(module, "out_features", getattr(module, "nf", None)))
        if width is not None and cfg.d_in != width:
            errors.append(f"{at}: '{folder}' reads {cfg.d_in} features; expected {width}, the width of {path} "
                          f"in '{spec.model}'")
        if cfg.d_sae != latent.size:
            errors.append(f"{at}: '{folder}' has {cfg.d_sae} latents; expected latent.size ({latent.size})")
        if kind(cfg.activation, cfg.k) != kind(latent.activation, latent.k):
            errors.append(f"{at}: '{folder}' is a {kind(cfg.activation, cfg.k)} SAE; expected "
                          f"{kind(latent.activation, latent.k)} (latent.activation, latent.k)")
    return errors


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
        if spec.adapter and (reason := check_adapter(spec, skeleton)):
            errors.append(f"{where}.adapter: {reason}")
        try:
            paths[spec.name] = [resolve_layer(skeleton, layer) for layer in spec.layers]
        except ValueError as e:
            errors.append(f"{where}.layer: {e}")
        if spec.sae and spec.name in paths:
            errors += check_sae_files(spec, where, skeleton, paths[spec.name], recipe.latent)
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
