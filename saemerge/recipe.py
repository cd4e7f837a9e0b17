"""The recipe: one YAML file that says what to merge and how, validated with pydantic.

Everything downstream (harvest -> train -> build -> evaluate -> report) reads this typed object only.
Field descriptions are the recipe reference: `saemerge explain` and the README table are generated from them
(recipe_reference.py), so a change of wording goes here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RecipeError


class Strict(BaseModel):
    # No nan or inf anywhere: a recipe number is a size, a weight or a rate, and a non-finite one poisons the model.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SourceSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$", description="Short name of the source, used in `merge.target`.")
    model: str = Field(description="Hub id or local folder of a Hugging Face causal LM.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    gguf_file: str | None = Field(None, description="A .gguf file inside `model` to load instead of safetensors (dequantized by transformers; needs the `gguf` package).")
    adapter: str | None = Field(None, description="A PEFT LoRA adapter (local folder or hub id) applied on top of `model` and merged into its weights.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype the source runs in (float32, bfloat16, float16).")
    device_map: str | None = Field(None, description="Spread the source over the devices with accelerate (`auto`, `balanced`, ...) instead of putting it on `train.device`.")
    layer: int | str | list[int | str] = Field(description=(
        "Block index i (the residual stream after block i = `hidden_states[i+1]`), a module path, or a list of them: the "
        "i-th layers of all sources form a *site* with its own shared latent space, SAEs, gates and injection. All "
        "sources list the same number."))
    trust_remote_code: bool = Field(False, description="Allow the source's own modeling code from its folder.")
    sae: str | list[str] | None = Field(None, description=(
        "SAE folder(s) to start this source's SAEs from, one per layer, in saemerge, SAELens or sparsify format; trained "
        "on with the others. Sources without one start as `latent.init` says (see "
        "[SAE interchange](#sae-interchange-saelens-sparsify))."))

    @property
    def layers(self) -> list[int | str]:
        return list(self.layer) if isinstance(self.layer, list) else [self.layer]

    @property
    def sae_folders(self) -> list[str]:
        return [] if self.sae is None else list(self.sae) if isinstance(self.sae, list) else [self.sae]


class LatentSpec(Strict):
    size: int = Field(gt=0, description="Number of latents shared by all SAEs.")
    activation: Literal["relu", "topk"] = Field("topk", description="topk (keep the k largest), or relu (sparse only through `l1`; see [ReLU and L1](#relu-and-l1)).")
    k: int = Field(32, gt=0, description="Active latents per token for topk.")
    bias: bool = Field(True, description="Encoder and decoder biases.")
    l1: float = Field(0.0, ge=0, description="L1 penalty on the codes (per token, in units of the input scale); what makes relu codes sparse.")
    l2: float = Field(0.0, ge=0, description="L2 (squared) penalty on the codes.")
    align: float = Field(1.0, ge=0, description="Weight of mean (1 - cos) between the sources' codes of the same token.")
    cross: float = Field(0.0, ge=0, description="Weight of cross-reconstruction: decode each source's code with every other decoder.")
    init: Literal["random", "data"] = Field("data", description="Initialise latents randomly or from activations of sampled tokens.")

    @model_validator(mode="after")
    def _k_fits(self):
        if self.activation == "topk" and self.k > self.size:
            raise ValueError(f"k={self.k} must not exceed size={self.size}")
        return self


class DatasetSpec(Strict):
    path: str = Field(description="`datasets.load_dataset` path: a hub name or a builder such as json, text, parquet.")
    name: str | None = Field(None, description="Dataset configuration name.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(None, description="Local files for json/text/parquet.")
    split: str = Field("train", description="Split to read.")
    text_column: str = Field("text", description="Column holding the text.")
    prompt_column: str | None = Field(None, description=(
        "Column holding a prompt that comes before the text (prompt-completion data, as TRL's SFT takes it). The SAEs "
        "read prompt and text as one document; calibration takes each row as a sequence of its own, padded to "
        "`data.seq_len`, with the next-token loss on the text only."))
    weight: float = Field(1.0, gt=0, description="Share of the mixture's tokens (normalised): each sequence comes from one dataset.")


class DataSpec(Strict):
    datasets: list[DatasetSpec] = Field(min_length=1, description="The mixture the SAEs train on.")
    seq_len: int = Field(128, ge=2, description="Tokens per sequence fed to the sources (at most their maximum positions).")
    tokens: int = Field(2_000_000, gt=0, description="Training token budget.")
    shuffle_buffer: int = Field(1000, ge=1, description="Documents held in the streaming shuffle buffer.")
    prepend_bos: bool | None = Field(None, description=(
        "Start every sequence with the tokenizer's BOS token; default: when the tokenizer adds one itself (Llama, "
        "Gemma), as the sources saw in training."), json_schema_extra={"default_text": "the tokenizer's habit"})
    cache: str | None = Field(None, description=(
        "Folder for harvested activations (safetensors, one file per batch), reused by later runs with the same sources, "
        "layers and data instead of running the sources again (see "
        "[Streaming](#streaming-activations-and-the-activation-cache))."))


class TrainSpec(Strict):
    batch_tokens: int = Field(4096, gt=0, description="Tokens per optimisation step (across all processes).")
    shuffle_batches: int = Field(8, ge=1, description="Batches of activations pooled and shuffled token-wise before training on them (1: none); memory holds this many.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (cosine decay to 10%).")
    # datasets takes seeds below 2^32, and calibration uses seed + 1 and seed + 2.
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for initialisation and data order (0 .. 2^31 - 1).")
    eval_tokens: int = Field(16384, gt=0, description="Fresh tokens for the final SAE metrics.")
    log_every: int = Field(25, gt=0, description="Steps between lines of training_log.jsonl.")
    resample_every: int = Field(25, ge=0, description="Steps between resamplings of latents dead in every source (0: never).")
    checkpoint_every: int = Field(200, ge=0, description="Steps between training checkpoints (0: only when interrupted and at the end); `--resume` continues from the last.")
    device: str = Field("auto", description="auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    autocast: bool = Field(False, description="Run the SAEs' forward under bfloat16 autocast (meant for GPUs with bf16 tensor cores; its speed was not measured here); weights, optimizer and metrics stay float32.")


class CalibrateSpec(Strict):
    steps: int = Field(0, ge=0, description="Steps of next-token training of the bridge (the SAE bridge's gates, the linear and cross-attention bridges' maps) and the router; the sources stay frozen (the target too unless `receiver`). On `calibrate.datasets` if given (with `data`'s `seq_len`, `prepend_bos` and `shuffle_buffer`; a `prompt_column` puts the loss on the text only, e.g. a task's answers), else on `data`.")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate for calibration.")
    batch_tokens: int = Field(2048, gt=0, description="Tokens per calibration step.")
    saes: bool = Field(False, description="`bridge: sae` only: fine-tune the SAEs (encoders, decoders) end to end with the gates, their reconstruction and alignment losses (as `latent` weighs them) kept as regularisers so the latents stay readable.")
    regularise: float = Field(1.0, ge=0, description="Weight of the SAEs' own losses beside the next-token loss when `saes` is set.")
    datasets: list[DatasetSpec] = Field(default_factory=list, description="What calibration trains on (default: `data.datasets`).")
    receiver: bool = Field(False, description="Also train the target's own weights (all but its input and output embeddings), so that it learns to read what the bridge sends; needs `heads: target` and `save.storage: self-contained` (the target's weights change).")


class MergeSpec(Strict):
    target: str = Field(description="Name of the source whose residual stream receives the features (`heads: target`).")
    combine: Literal["sum", "mean"] = Field("mean", description="sum: add decoded features; mean: average reconstructions, keep the receiver's error.")
    # Bounded so that float32 stays finite: a scale of 1e308 saves a model whose logits are inf.
    scale: float = Field(1.0, ge=-1000, le=1000, description="Multiplies what is brought in (0: no feature exchange; -1000 .. 1000).")
    # None means every source but the target (SAEMergedConfig fills it in): the reference shows that in words.
    inject: list[str] | None = Field(None, description="Sources whose features are injected (`heads: target`).",
                                     json_schema_extra={"default_text": "all but the target"})
    bridge: Literal["sae", "linear", "cross_attention"] = Field("sae", description="What carries features between the sources: `sae` (codes of the shared latent space, decoded into the receiver), `linear` (a dense map between residual streams, the stitching baseline), `cross_attention` (the receiver attends over the sender's residuals of earlier and current positions, CALM's design). See [Bridges](#bridges-and-the-composition-benchmark).")
    heads: Literal["target", "mean", "router"] = Field("target", description="target: one stream, the target's head; mean / router: every source receives the others' features and keeps its head, the distributions averaged / mixed per token by a learned router.")
    gates: list[Literal["latent", "token"]] = Field(default_factory=list, description=(
        "Learned gates on what is injected: `latent` (one per latent), `token` (one per token, from the sources' "
        "residuals); trained by `merge.calibrate`."))
    calibrate: CalibrateSpec = Field(default_factory=CalibrateSpec)


class EvalSpec(Strict):
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names run after the merge.")
    include_path: str | None = Field(None, description="Folder of local lm-eval task YAMLs.")
    limit: float | None = Field(None, gt=0, description="Documents per task (a fraction if < 1).")
    batch_size: int = Field(8, gt=0, description="lm-eval batch size.")
    max_length: int | None = Field(None, gt=1, description="Context lm-eval scores with (rolling windows); default: the target's maximum positions.")


class SaveSpec(Strict):
    storage: Literal["self-contained", "reference"] = Field("self-contained", description="`self-contained`: the sources' weights go into the folder; `reference`: only the SAEs, gates and router, with the sources' ids, revisions and adapters to load them from at load time (like a PEFT adapter).")
    max_shard_size: str = Field("5GB", pattern=r"^[0-9]+(GB|MB|KB|GiB|MiB|KiB)$", description="Weight files larger than this are split into shards with an index file (`5GB`, `500MB`, ...).")


class LoraSpec(Strict):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field("all-linear", description="Modules that get an adapter, as peft takes them (`all-linear`: every linear layer but the head).")


class DistillSpec(Strict):
    student: str | None = Field(None, description="The student: a source's name (it starts from that source's weights), or a Hub id or local folder of a causal LM with the same tokenizer.", json_schema_extra={"default_text": "merge.target"})
    student_config: dict[str, Any] = Field(default_factory=dict, description="Overrides of the student's config for a smaller model of its architecture (e.g. `{num_hidden_layers: 2}`): tensors whose name and shape agree are copied from the student, the rest initialised fresh.")
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter through peft (folded into the weights when saved) instead of every weight.")
    tokens: int = Field(1_000_000, gt=0, description="Training token budget.")
    batch_tokens: int = Field(4096, gt=0, description="Tokens per optimisation step.")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (linear warm-up over the first 5% of steps, then cosine decay to 10%). Pick it on held-out data: the zoo's small GPT-2s took 1e-3 on the validation split; Gemma-3-270m trained whole diverged at 3e-4.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of teacher and student in the KL term (its gradient is scaled back by T^2).")
    ce_weight: float = Field(0.5, ge=0, le=1, description="Weight of the plain next-token loss; the KL to the teacher gets 1 - ce_weight.")
    features: float = Field(0.0, ge=0, description="Weight of the feature term: mean (1 - cos) between the student's code (its residual at each site, encoded by its source's SAE) and the merged code there (the sources' codes combined as `merge.combine` says). Needs a student of a source's width with the site's module.")
    top_k: int | None = Field(None, gt=0, description="Keep only the teacher's k most likely tokens per position, and the mass of the rest (the KL between the two distributions coarsened to k + 1 outcomes).", json_schema_extra={"default_text": "all tokens up to 65,536, else 1024"})
    datasets: list[DatasetSpec] = Field(default_factory=list, description="What the student trains on (default: `data.datasets`), with `data`'s `seq_len`, `prepend_bos` and `shuffle_buffer`.")
    output: str | None = Field(None, description="Folder the student is written to.", json_schema_extra={"default_text": "output + `-distilled`"})
    log_every: int = Field(25, gt=0, description="Steps between lines of distill_log.jsonl (with the held-out losses).")
    checkpoint_every: int = Field(200, ge=0, description="Steps between checkpoints (0: only when interrupted); `--resume` continues from the last.")


class SAERecipe(Strict):
    """What `saemerge train-saes` reads: the sources and their sites, the latent space, the data and the training
    (a merge recipe's first sections; its merge-only sections are ignored there)."""
    name: str = Field(description="Name of the merge.")
    models: list[SourceSpec] = Field(min_length=1, description="The sources.")
    latent: LatentSpec
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    output: str = Field(description="Folder the merged model (`saemerge merge`) or the dictionaries (`saemerge train-saes`) are written to.")

    def source(self, name: str) -> SourceSpec:
        return next(s for s in self.models if s.name == name)


class Recipe(SAERecipe):
    models: list[SourceSpec] = Field(min_length=2, description="Two or more sources (`saemerge train-saes` takes one).")
    merge: MergeSpec
    eval: EvalSpec = Field(default_factory=EvalSpec)
    save: SaveSpec = Field(default_factory=SaveSpec)
    distill: DistillSpec | None = Field(None, description="Distil the merged model into one model after the merge (`saemerge distill` runs it on a saved merge).")


# Sections only a merge reads: `train-saes` given a merge recipe leaves them out.
MERGE_ONLY = sorted(set(Recipe.model_fields) - set(SAERecipe.model_fields))


def _cross_field_errors(recipe: SAERecipe) -> list[str]:
    """Checks pydantic cannot attach to a single field."""
    errors = []
    names = [s.name for s in recipe.models]
    for i, name in enumerate(names):
        if name in names[:i]:
            errors.append(f"models.{i}.name: '{name}' is used twice; expected unique source names")
    counts = [len(s.layers) for s in recipe.models]
    for i, spec in enumerate(recipe.models):
        if counts[i] == 0:
            errors.append(f"models.{i}.layer: empty list; expected at least one layer")
        elif counts[i] != counts[0]:
            errors.append(f"models.{i}.layer: {counts[i]} layers; expected as many as models.0 ({counts[0]}): "
                          "the i-th layers of all sources share one latent space")
        # A source starts all its SAEs from files or none of them; other sources may start fresh.
        if spec.sae is not None and len(spec.sae_folders) != counts[i]:
            errors.append(f"models.{i}.sae: {len(spec.sae_folders)} given; expected one folder per layer ({counts[i]})")
    if isinstance(recipe, Recipe):
        errors += _merge_errors(recipe, names)
    return errors + _lone_surrogates(recipe.model_dump())


def _merge_errors(recipe: Recipe, names: list[str]) -> list[str]:
    errors = []
    if recipe.merge.target not in names:
        errors.append(f"merge.target: '{recipe.merge.target}' is not a source; expected one of {names}")
    for j, name in enumerate(recipe.merge.inject or []):
        if name not in names or name == recipe.merge.target:
            errors.append(f"merge.inject.{j}: '{name}' expected a source other than the target, one of {names}")
    if recipe.merge.inject is not None and not recipe.merge.inject:
        errors.append("merge.inject: empty; expected at least one source to inject")
    if recipe.merge.calibrate.saes and recipe.merge.bridge != "sae":
        errors.append(f"merge.calibrate.saes: true with bridge '{recipe.merge.bridge}'; expected bridge: sae (only "
                      "its SAEs carry the features)")
    if recipe.merge.calibrate.receiver and recipe.merge.heads != "target":
        errors.append(f"merge.calibrate.receiver: true with heads '{recipe.merge.heads}'; expected heads: target (the "
                      "receiver trained is the target)")
    if recipe.merge.calibrate.receiver and recipe.save.storage != "self-contained":
        errors.append("merge.calibrate.receiver: true with save.storage: reference; expected self-contained (the "
                      "target's trained weights must be saved)")
    distill = recipe.distill
    if distill is not None and distill.lora is not None and distill.student_config:
        errors.append("distill.lora: set with distill.student_config; expected one of them (a new, smaller student "
                      "trains all its weights)")
    return errors


def _lone_surrogates(node: Any, path: str = "") -> list[str]:
    """Text no file can hold as UTF-8 (YAML's "\\ud800" escape gives a lone surrogate): one line per field."""
    if isinstance(node, str):
        try:
            node.encode("utf-8")
            return []
        except UnicodeEncodeError:
            return [f"{path}: {node!r:.60} holds a lone surrogate; expected valid Unicode text"]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    return [line for key, value in items for line in _lone_surrogates(value, f"{path}.{key}".lstrip("."))]


def _format_pydantic(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "missing; this field is required"
        got = "" if e["type"] == "missing" else f" (got {e['input']!r:.60})"
        lines.append(f"{loc}: {msg}{got}")
    return lines


def set_override(raw: dict, assignment: str) -> None:
    """Apply `a.b.0.c=value` (value parsed as YAML) to a nested dict/list in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {assignment}: expected KEY=VALUE such as train.seed=3")
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            if node.get(part) is None:  # a section left out or written as null (`distill: null`)
                node[part] = {}
            node = node[part]
        else:
            raise RecipeError(f"--set {key}: '{'.'.join(parts[:depth + 1])}' does not exist in the recipe")
    last = parts[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise RecipeError(f"--set {key}: index {last} is out of range")
        node[int(last)] = yaml.safe_load(value)
    elif isinstance(node, dict):
        node[last] = yaml.safe_load(value)
    else:
        raise RecipeError(f"--set {key}: cannot set a key inside a {type(node).__name__}")


def parse_recipe(raw: Any, where: str = "recipe", overrides: list[str] = (), schema: type[SAERecipe] = Recipe):
    """Validate a recipe given as a dict as a `schema` (Recipe, or SAERecipe for `train-saes`, which leaves a merge
    recipe's merge-only sections out); raise RecipeError with every problem found."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a YAML mapping at the top level, got {type(raw).__name__}")
    if schema is SAERecipe:
        raw = {key: value for key, value in raw.items() if key not in MERGE_ONLY}
    for assignment in overrides:
        set_override(raw, assignment)
    try:
        recipe = schema.model_validate(raw)
    except ValidationError as e:
        raise RecipeError([f"{where}: {line}" for line in _format_pydantic(e)]) from None
    errors = _cross_field_errors(recipe)
    if errors:
        raise RecipeError([f"{where}: {line}" for line in errors])
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = (), schema: type[SAERecipe] = Recipe):
    """Read and validate a recipe file (structure only; `check_sources` looks at the models)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"{path}: not valid YAML: {first}") from None
    return parse_recipe(raw, str(path), overrides, schema)


def recipe_yaml(recipe: SAERecipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
