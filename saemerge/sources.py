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


def check_adapter(spec: SourceSpec, skeleton: PreTrainedModel, allow_pickle: bool = False) -> str | None:
    """Why the LoRA adapter cannot apply to this base (None if it can): files, method and every module shape."""
    from peft import PeftConfig

    folder = Path(spec.adapter)
    if not folder.is_dir():
        if spec.adapter.startswith((".", "/")) or folder.suffix:
            return f"folder '{spec.adapter}' does not exist"
        return None  # a hub id: checked when it is fetched
    weights = folder / "adapter_model.safetensors"
    pickled = (folder / "adapter_model.bin").is_file()
    if not (folder / "adapter_config.json").is_file() or not (weights.is_file() or pickled):
        return f"'{folder}' is not a PEFT adapter; expected adapter_config.json and adapter_model.safetensors"
    if not weights.is_file() and not allow_pickle:
        return (f"'{folder}' holds adapter_model.bin, a pickle (loading it can run code); expected "
                "adapter_model.safetensors — convert it, or pass --allow-pickle if you trust the file")
    try:
        config = PeftConfig.from_pretrained(folder)
    except Exception as e:
        return f"unreadable adapter_config.json: {one_line(e)}"
    if config.peft_type != "LORA":
        return f"is a {config.peft_type} adapter; expected LoRA"
    if not weights.is_file():
        return None  # an allowed pickle: its shapes are checked when peft loads it
    shapes = read_shapes(weights)
    if isinstance(shapes, str):
        return shapes
    for key, shape in shapes.items():
        if not key.endswith(("lora_A.weight", "lora_B.weight")):
            continue
        path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        try:
            module = skeleton.get_submodule(path)
        except AttributeError:
            return f"adapts '{path}', which '{spec.model}' does not have: an adapter for another base"
        expected = module.in_features if key.endswith("lora_A.weight") else module.out_features
        found = shape[1] if key.endswith("lora_A.weight") else shape[0]
        if found != expected:
            return (f"'{path}' has {found} features in the adapter and {expected} in '{spec.model}': "
                    "an adapter for another base")
    return None


def read_shapes(file: Path) -> dict[str, list[int]] | str:
    """{tensor name: shape} from a safetensors header (no tensor is read), or why the file cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # truncated, not safetensors at all, unreadable
        return f"'{file}' is not a readable safetensors file: {one_line(e)}"


PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_weights(folder: Path, where: str, skeleton: PreTrainedModel, allow_pickle: bool = False) -> list[str]:
    """A local folder's weights: safetensors (pickles only with `allow_pickle`), every file readable, and every
    tensor of the shape its config.json gives. Reads the headers only."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for pattern in PICKLES for p in folder.glob(pattern))
        if not pickles:
            return [f"{where}: '{folder}' holds no weights; expected *.safetensors weights"]
        if allow_pickle:
            return []
        one = len(pickles) == 1
        what = "a pickle (loading it can run code)" if one else "pickles (loading them can run code)"
        return [f"{where}: '{folder}' holds {', '.join(pickles)}, {what}; expected *.safetensors weights — "
                f"convert {'it' if one else 'them'}, or pass --allow-pickle if you trust the file{'' if one else 's'}"]
    config = skeleton.config
    # A quantized checkpoint stores packed tensors of other shapes than the (unquantized) skeleton's.
    compare = getattr(config, "quantization_config", None) is None
    expected = {name: list(t.shape) for name, t in [*skeleton.named_parameters(remove_duplicate=False),
                                                    *skeleton.named_buffers()]}
    prefix = skeleton.base_model_prefix
    errors = []
    for file in files:
        shapes = read_shapes(file)
        if isinstance(shapes, str):
            errors.append(f"{where}: {shapes}")
            continue
        # Only names both sides know: checkpoints may leave out tied weights or the base model's prefix.
        wrong = [(key, shape, expected.get(key, expected.get(f"{prefix}.{key}"))) for key, shape in shapes.items()]
        wrong = [(key, shape, want) for key, shape, want in wrong if compare and want is not None and shape != want]
        if wrong:
            key, shape, want = wrong[0]
            text = config.get_text_config().to_dict()
            hint = [f"{k} {v}" for k, v in text.items() if type(v) is int and v in set(want) - set(shape)][:2]
            more = f"; {len(wrong) - 1} other tensors differ too" if len(wrong) > 1 else ""
            errors.append(f"{where}: '{file}' has {key} {shape}; expected {want} from config.json"
                          + (f" ({', '.join(hint)}?)" if hint else "") + more)
    return errors


def layer_width(skeleton: PreTrainedModel, path: str) -> int | None:
    """Features of a module's output: block outputs have the hidden size, linear layers their out_features
    (GPT-2's Conv1D: nf); None for other modules (known once activations exist)."""
    if path.rpartition(".")[0] == find_blocks(skeleton)[0]:
        return skeleton.config.get_text_config().hidden_size
    module = skeleton.get_submodule(path)
    return getattr(module, "out_features", getattr(module, "nf", None))


def check_sae_files(spec: SourceSpec, where: str, skeleton: PreTrainedModel, paths: list[str],
                    latent: LatentSpec) -> list[str]:
    """The source's `sae:` folders must hold SAEs of its layers' widths with the recipe's latent size, activation
    and k (the merged model builds every SAE from `latent`)."""
    from .interchange import import_sae

    errors = []
    kind = lambda activation, k: f"topk (k {k})" if activation == "topk" else activation
    for j, (folder, path) in enumerate(zip(spec.sae_folders, paths)):
        at = f"{where}.sae" + (f".{j}" if isinstance(spec.sae, list) else "")
        if not Path(folder).is_dir():
            errors.append(f"{at}: folder '{folder}' does not exist")
            continue
        try:
            cfg = import_sae(folder).cfg
        except Exception as e:  # any reader failure becomes one line naming the folder
            errors.append(f"{at}: cannot import '{folder}': {one_line(e)}")
            continue
        width = layer_width(skeleton, path)
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


def check_sources(recipe: Recipe, allow_pickle: bool = False) -> dict:
    """Check what needs the models' configs and tokenizers; return {name: module paths of its layers}.

    Cheap: reads configs, tokenizers and the headers of local weight files, and builds each architecture on the
    meta device (no weights). Raises RecipeError with every problem found.
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
            skeleton = build_skeleton(spec)
        except Exception as e:  # any loader failure becomes one line naming the source
            errors.append(f"{where}.model: cannot load '{spec.model}' as a causal LM: {one_line(e)}")
            continue
        if local.is_dir() and not spec.gguf_file:  # a Hub id's files are only seen when it is loaded
            errors += check_weights(local, f"{where}.model", skeleton, allow_pickle)
        text = skeleton.config.get_text_config()
        positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        for field, length in (("data.seq_len", recipe.data.seq_len), ("eval.max_length", recipe.eval.max_length)):
            if positions and length and length > positions:  # longer inputs crash in the position embeddings
                errors.append(f"{field}: {length} tokens; expected at most {positions}, the maximum positions of "
                              f"{where} ('{spec.model}')")
        if spec.adapter and (reason := check_adapter(spec, skeleton, allow_pickle)):
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
            errors.append(f"{where}.model: cannot load the tokenizer of '{spec.model}': {one_line(e)}")
    names = list(tokenizers)
    for name in names[1:]:
        if not _tokenizers_match(tokenizers[names[0]], tokenizers[name]):
            i = [s.name for s in recipe.models].index(name)
            errors.append(f"models.{i}.model: tokenizer of '{name}' differs from that of '{names[0]}'; "
                          "expected sources that share one tokenizer")
    if errors:
        raise RecipeError(errors)
    return paths
