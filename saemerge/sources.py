"""Loading the source models a recipe names, and the checks that need them (layers, tokenizers)."""

from __future__ import annotations

from functools import lru_cache
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
    return _tokenizer(spec.model, spec.revision, spec.gguf_file, spec.trust_remote_code)


@lru_cache(maxsize=8)
def _tokenizer(model: str, revision: str | None, gguf_file: str | None, trust_remote_code: bool):
    # Building a tokenizer from a GGUF file takes tens of seconds: once per file and run.
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(model, **{k: v for k, v in kwargs.items() if v is not None})


def load_source(spec: SourceSpec, device: str | torch.device = "cpu") -> PreTrainedModel:
    """A frozen source in eval mode, its adapter merged in. Weights come from safetensors or GGUF, never pickles."""
    kwargs = _load_kwargs(spec)
    if not spec.gguf_file:
        kwargs["use_safetensors"] = True
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=DTYPES[spec.dtype], **kwargs)
    if spec.gguf_file:
        # GGUF weights arrive dequantized; drop the quantizer so the merged model saves like any other.
        del model.config.quantization_config
        model.hf_quantizer = None
    if spec.adapter:
        from huggingface_hub import snapshot_download
        from peft import PeftModel

        # Fetch only the safetensors file: peft itself would fall back to a pickled adapter_model.bin.
        folder = spec.adapter if Path(spec.adapter).is_dir() else snapshot_download(
            spec.adapter, allow_patterns=["adapter_config.json", "adapter_model.safetensors"])
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    model.requires_grad_(False)
    return model.eval() if spec.device_map else model.eval().to(device)


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
