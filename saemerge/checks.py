"""Pre-flight checks: everything about a recipe that can be known before any weight is loaded or any step
trained (sources, layers, adapters, SAE files, tokenizers, data, devices, the output folder and its disk), each
problem one line naming its field. `validate` runs them all.

Cheap: reads configs, tokenizers and the headers of local weight files, and builds each architecture on the meta
device (no weights).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import PreTrainedModel

from . import distributed
from .checkpoint import STATE, checkpoint_folder
from .data import calibration_data, open_mixture
from .distill import default_output
from .errors import RecipeError
from .files import inside
from .hooks import resolve_layer
from .pretrained import DTYPES
from .recipe import LatentSpec, Recipe, SourceSpec
from .retokenize import same_tokenizer, spelling_problem
from .sources import build_skeleton, layer_width, load_tokenizer, one_line, resolve_device


def validate(recipe: Recipe, output: str | Path | None = None, overwrite: bool = False,
             resume: bool = False, allow_pickle: bool = False) -> dict[str, str]:
    """Every check that can run before training; returns {source: module paths of its layers}. Pickled weights
    are refused unless `allow_pickle` (an argument, never a recipe field: a recipe from someone else cannot opt in)."""
    output = Path(output or recipe.output)
    if (size := len(output.name.encode("utf-8", "surrogatepass"))) > 200:  # filesystems allow 255 bytes
        raise RecipeError(f"output: a folder name of {size} bytes; expected at most 200 (the hidden working files "
                          "beside it are named after it, plus a suffix)")  # before any of them is looked at
    errors = []
    checkpoint = checkpoint_folder(output)
    if resume and not (checkpoint / STATE).is_file():
        errors.append(f"--resume: no checkpoint at '{checkpoint}'; expected one left by an interrupted run of this "
                      "recipe with this output folder")
    elif (checkpoint / STATE).is_file() and not (resume or overwrite):
        errors.append(f"output: an interrupted run left a checkpoint at '{checkpoint}'; pass --resume to continue "
                      "it or --overwrite to start over")
    if output.exists() and not overwrite:
        errors.append(f"output: '{output}' already exists; expected a new folder (or pass --overwrite)")
    if output.exists() and not output.is_dir():
        errors.append(f"output: '{output}' is a file; expected a folder")
    merging = isinstance(recipe, Recipe)  # else an SAERecipe: `train-saes` writes dictionaries only
    if merging and recipe.distill is not None:  # found now, not after the merge
        student = default_output(recipe, output)
        if student.exists() and not overwrite:
            errors.append(f"distill.output: '{student}' already exists; expected a new folder (or pass --overwrite)")
    try:
        paths = check_sources(recipe, allow_pickle)
        errors += check_output(recipe, output, paths)
    except RecipeError as e:
        errors += e.lines
    for data, where in [(recipe.data, "data")] + ([calibration_data(recipe)] if merging and recipe.merge.calibrate.datasets else []):
        try:
            open_mixture(data, recipe.train.seed, where)
        except RecipeError as e:
            errors += e.lines
    try:
        resolve_device(recipe.train.device)
    except RecipeError as e:
        errors += e.lines
    if recipe.data.cache:
        cache = Path(recipe.data.cache)
        if cache.exists() and not cache.is_dir():
            errors.append(f"data.cache: '{cache}' is a file; expected a folder")
        elif cache.resolve().is_relative_to(output.resolve()):
            errors.append(f"data.cache: '{cache}' is inside the output folder, which a merge replaces whole; "
                          "expected a folder elsewhere")
    sequences = max(1, recipe.train.batch_tokens // recipe.data.seq_len)
    if sequences % distributed.world():
        errors.append(f"train.batch_tokens: {sequences} sequences per step cannot be shared by {distributed.world()} "
                      f"processes; expected a multiple of {distributed.world() * recipe.data.seq_len} tokens")
    if merging and recipe.eval.include_path and not Path(recipe.eval.include_path).is_dir():
        errors.append(f"eval.include_path: folder '{recipe.eval.include_path}' does not exist")
    if errors:
        raise RecipeError(errors)
    return paths


def check_output(recipe: Recipe, output: Path, paths: dict[str, list[str]]) -> list[str]:
    """Where the merge writes: every SAE folder inside the output folder, and room on its disk."""
    errors = []
    try:
        for i, spec in enumerate(recipe.models):
            for path in paths[spec.name]:
                try:
                    inside(output, "saes", spec.name, path)
                except RecipeError as e:
                    errors += [f"models.{i}.layer: {line}" for line in e.lines]
        return errors + check_disk(recipe, output, paths)
    except (OSError, ValueError) as e:  # a NUL byte, an unencodable name: no such folder can exist
        return errors + [f"output: cannot write to {str(output)!r}: {e}; expected a folder path"]


def output_bytes(recipe: Recipe, paths: dict[str, list[str]]) -> int:
    """About how many bytes a merge writes, from the sources' shapes: their weights in the recipe's dtypes
    (self-contained storage), every SAE twice (in model.safetensors and saes/: W_enc and W_dec in float32),
    and 10 MB for the tokenizer, code, report and plots."""
    total = 10 * 10**6
    for spec in recipe.models:
        skeleton = build_skeleton(spec)
        if isinstance(recipe, Recipe) and recipe.save.storage == "self-contained":
            total += sum(p.numel() for p in skeleton.parameters()) * DTYPES[spec.dtype].itemsize
        for path in paths[spec.name]:
            d_in = layer_width(skeleton, path) or skeleton.config.get_text_config().hidden_size
            total += 2 * (2 * d_in * recipe.latent.size * 4)
    return total


def size_text(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_disk(recipe: Recipe, output: Path, paths: dict[str, list[str]]) -> list[str]:
    """One line if the disk the output goes to has less free space than the merge writes, plus 10%."""
    need = output_bytes(recipe, paths)
    existing = output.resolve()
    while not existing.exists():  # the output and its parents may not exist yet
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free >= need * 1.1:
        return []
    return [f"output: the merge will write about {size_text(need)} to '{output}', which has {size_text(free)} "
            f"free; expected at least {size_text(need * 1.1)} free"]


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
        for field, length in (("data.seq_len", recipe.data.seq_len), ("eval.max_length", getattr(recipe, "eval", None) and recipe.eval.max_length)):
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
    errors += check_tokenizers(recipe, tokenizers)
    if errors:
        raise RecipeError(errors)
    return paths
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


def check_tokenizers(recipe: Recipe, tokenizers: dict) -> list[str]:
    """Sources may read with tokenizers of their own (retokenize.py) if every tokenizer involved spells its text
    back in bytes, and only where no two heads' distributions are mixed (`heads: target`)."""
    names = [s.name for s in recipe.models]
    merging = isinstance(recipe, Recipe)
    reference = recipe.merge.target if merging and recipe.merge.target in tokenizers else next(iter(tokenizers), None)
    others = [n for n in tokenizers if not same_tokenizer(tokenizers[reference], tokenizers[n])]
    if not others:
        return []
    errors = [f"models.{names.index(n)}.model: the tokenizer of '{n}' cannot be aligned with another one: {problem}; "
              "expected a byte-level BPE or SentencePiece tokenizer whose tokens spell the text"
              for n in [reference, *others] if (problem := spelling_problem(tokenizers[n]))]
    if merging and recipe.merge.heads != "target":
        errors.append(f"merge.heads: '{recipe.merge.heads}' mixes the sources' next-token distributions, which needs "
                      f"one tokenizer, and '{others[0]}' reads with another than '{reference}'; expected heads: target")
    return errors


