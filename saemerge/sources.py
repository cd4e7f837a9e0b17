"""Loading the source models a recipe names (checks.py looks at them before they are loaded)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import RecipeError
from .hooks import find_blocks
from .pretrained import load_pretrained_source
from .recipe import SourceSpec


def resolve_device(setting: str) -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
        torch.ones(1, device=device).item()  # one this machine has, that holds data (not meta)
    except (RuntimeError, AssertionError):  # torch asserts "Torch not compiled with CUDA enabled"
        raise RecipeError(f"train.device: '{setting}' is not a device of this machine; expected auto, cpu, cuda, "
                          "cuda:1, ...") from None
    return device


def one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_tokenizer(spec: SourceSpec):
    return _tokenizer(spec.model, spec.revision, spec.gguf_file, spec.trust_remote_code)


@lru_cache(maxsize=8)
def _tokenizer(model: str, revision: str | None, gguf_file: str | None, trust_remote_code: bool):
    # Building a tokenizer from a GGUF file takes tens of seconds: once per file and run.
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(model, **{k: v for k, v in kwargs.items() if v is not None})


def load_source(spec: SourceSpec, device: str | torch.device = "cpu", allow_pickle: bool = False) -> PreTrainedModel:
    """A frozen source in eval mode, its adapter merged in. Weights come from safetensors or GGUF; pickles only
    with `allow_pickle` (loading a pickle can run code)."""
    model = load_pretrained_source(**reference(spec), device_map=spec.device_map, allow_pickle=allow_pickle)
    return model if spec.device_map else model.to(device)


def reference(spec: SourceSpec) -> dict:
    """How to load the source again later (the arguments of `load_pretrained_source`); local paths made absolute."""
    local = lambda path: str(Path(path).resolve()) if path and Path(path).exists() else path
    return {"model": local(spec.model), "revision": spec.revision, "gguf_file": spec.gguf_file,
            "adapter": local(spec.adapter), "dtype": spec.dtype, "trust_remote_code": spec.trust_remote_code}


def layer_width(skeleton: PreTrainedModel, path: str) -> int | None:
    """Features of a module's output: block outputs have the hidden size, linear layers their out_features
    (GPT-2's Conv1D: nf); None for other modules (known once activations exist)."""
    if path.rpartition(".")[0] == find_blocks(skeleton)[0]:
        return skeleton.config.get_text_config().hidden_size
    module = skeleton.get_submodule(path)
    return getattr(module, "out_features", getattr(module, "nf", None))


def build_skeleton(spec: SourceSpec) -> PreTrainedModel:
    """The source's architecture from its config, on the meta device: names and shapes, no weights."""
    file = Path(spec.model) / (spec.gguf_file or "config.json")
    version = file.stat().st_mtime_ns if file.is_file() else None  # an edited config.json is read again
    return _skeleton(spec.model, spec.revision, spec.gguf_file, spec.trust_remote_code, version)


@lru_cache(maxsize=8)
def _skeleton(model: str, revision: str | None, gguf_file: str | None, trust_remote_code: bool, version: int | None):
    # Reading the config of a GGUF file takes seconds (11 s for Gemma-3-270m): once per file and run.
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    config = AutoConfig.from_pretrained(model, **{k: v for k, v in kwargs.items() if v is not None})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    skeleton.tie_weights()  # transformers 5.0 leaves a model built on the meta device untied
    return skeleton


