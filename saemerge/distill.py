"""Distillation: the merged model's next-token distribution taught to one model, which then runs at one model's
cost. BabyLlama (Timiryasov and Tastet, 2023) distilled an ensemble of two models into a student that beat both;
its recipe (temperature 2, half weight on the plain loss) is the default.

  loss = (1 - ce_weight) * T^2 * KL(teacher_T || student_T) + ce_weight * CE(student, next token)
         + features * mean(1 - cos(Enc(h_student), merged code))       at every site, position 0 left out

The teacher runs beside the student batch by batch (nothing is stored). With a large vocabulary only the
teacher's top-k tokens per position and the mass of the rest are kept: the KL between the two distributions
coarsened to k + 1 outcomes, exact when k is the vocabulary. The merged code of a site is every source's code
there, combined as the merge combines them (`mean`: their mean; `sum`: their sum), the code the target's residual
receives. The student (a source, another causal LM with the same tokenizer, or a smaller config of a source's
architecture; whole or through a LoRA) is saved as a plain Hugging Face folder that loads without saemerge.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from . import checkpoint as checkpoint_io
from .card import write_model_card
from .checkpoint import STATE, checkpoint_folder
from .data import labelled_batches
from .errors import RecipeError, UserError
from .evaluate import evaluate
from .files import new_folder
from .hooks import ResidualHook, run_to_layers
from .recipe import DistillSpec, Recipe, recipe_yaml
from .sources import one_line
from .train import StopRequests, TrainingDiverged, TrainingInterrupted, TrainingLog, lr_factor

FULL_VOCABULARY, AUTO_TOP_K = 65_536, 1024  # above this many tokens the teacher is kept top-k by default


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler's rule); -inf at x = 0."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_targets(logits: torch.Tensor, temperature: float, top_k: int | None):
    """The tempered teacher distribution to match: (indices, log-probabilities, log of the remaining mass); indices
    and the remaining mass are None when every token is kept."""
    log_probs = (logits.float() / temperature).log_softmax(-1)
    if top_k is None or top_k >= log_probs.shape[-1]:
        return None, log_probs, None
    top, indices = log_probs.topk(top_k, dim=-1)
    return indices, top, log1mexp(top.logsumexp(-1).clamp(max=0))


def kl_to_teacher(student_logits: torch.Tensor, teacher, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per position, at the temperature, over the tokens the teacher kept (plus the rest)."""
    indices, t_log, t_rest = teacher
    s_log = (student_logits.float() / temperature).log_softmax(-1)
    if indices is None:
        return (t_log.exp() * (t_log - s_log)).sum(-1)
    s_top = s_log.gather(-1, indices)
    s_rest = log1mexp(s_top.logsumexp(-1).clamp(max=0))
    # A rest of zero mass contributes nothing; the clamp keeps 0 * (-inf) from making nan.
    t_rest, s_rest = t_rest.clamp(min=-100), s_rest.clamp(min=-100)
    return (t_log.exp() * (t_log - s_top)).sum(-1) + t_rest.exp() * (t_rest - s_rest)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                      spec: DistillSpec, top_k: int | None) -> dict[str, torch.Tensor]:
    """The KL and next-token terms (means over the positions with a label) and their weighted sum."""
    keep = labels[:, 1:] != -100
    student = student_logits[:, :-1][keep]
    ce = nn.functional.cross_entropy(student.float(), labels[:, 1:][keep])
    if teacher_logits is None:  # ce_weight 1: plain fine-tuning, the control with no teacher
        return {"kd": torch.zeros_like(ce), "ce": ce, "loss": ce}
    teacher = teacher_logits[:, :-1][keep]
    kd = spec.temperature ** 2 * kl_to_teacher(student, teacher_targets(teacher, spec.temperature, top_k),
                                               spec.temperature).mean()
    return {"kd": kd, "ce": ce, "loss": (1 - spec.ce_weight) * kd + spec.ce_weight * ce}


@torch.no_grad()
def merged_codes(teacher, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """At every site, the sources' codes of the same tokens combined as the merge combines them."""
    names, config = teacher.config.names, teacher.config
    residuals = {n: run_to_layers(teacher.sources[n], teacher.layers[n], input_ids) for n in names}
    codes = []
    for site in range(config.n_sites):
        site_codes = [teacher.saes[site][n].encode(residuals[n][site]).float() for n in names]
        codes.append(sum(site_codes) / (1 if config.combine == "sum" else len(site_codes)))
    return codes


def feature_loss(teacher, source: str, student_residuals: list[torch.Tensor], codes: list[torch.Tensor]):
    """Mean (1 - cos) between the student's codes (its source's SAEs) and the merged codes, position 0 left out."""
    total = 0.0
    for site, (h, target) in enumerate(zip(student_residuals, codes)):
        z = teacher.saes[site][source].encode(h).float()
        total = total + (1 - nn.functional.cosine_similarity(z[:, 1:], target[:, 1:], dim=-1)).mean()
    return total / len(codes)


def smaller(model: PreTrainedModel, overrides: dict, seed: int) -> PreTrainedModel:
    """A model of `model`'s architecture with `overrides` in its config; tensors whose name and shape agree are
    copied from `model` (the first blocks, the embeddings), the rest initialised as the architecture does."""
    config = copy.deepcopy(model.config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise RecipeError(f"distill.student_config.{key}: not a field of {type(config).__name__}; expected one "
                              "such as num_hidden_layers or hidden_size")
        setattr(config, key, value)
    torch.manual_seed(seed)
    try:
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:
        raise RecipeError(f"distill.student_config: cannot build {type(config).__name__}: {one_line(e)}") from None
    own = model.state_dict()
    state = {k: v for k, v in student.state_dict().items()}
    copied = {k: own[k] for k, v in state.items() if k in own and own[k].shape == v.shape}
    student.load_state_dict(copied, strict=False)
    return student


def build_student(teacher, recipe: Recipe, spec: DistillSpec, tokenizer, allow_pickle: bool = False):
    """(the student, float32 and trainable; the source whose SAEs and sites read it, or None)."""
    name = spec.student or recipe.merge.target
    sources = getattr(teacher, "sources", {})
    if name in sources:
        model, source = copy.deepcopy(sources[name]), name
    else:
        from transformers import AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, use_safetensors=not allow_pickle)
            theirs = AutoTokenizer.from_pretrained(name).get_vocab()
        except Exception as e:
            known = f"a source ({', '.join(sources)}) or " if sources else ""
            raise RecipeError(f"distill.student: cannot load '{name}': {one_line(e)}; expected {known}a causal LM "
                              "folder or Hub id") from None
        if theirs != tokenizer.get_vocab():
            raise RecipeError(f"distill.student: '{name}' has another tokenizer; expected the teacher's (the KL "
                              "compares distributions over the same tokens)")
        source = recipe.merge.target if recipe.merge.target in sources else None
    if spec.student_config:
        model = smaller(model, spec.student_config, recipe.train.seed)
    device = teacher.get_output_embeddings().weight.device
    model = model.to(device, torch.float32).train()
    model.requires_grad_(True)
    return model, source


def with_lora(model: PreTrainedModel, spec: DistillSpec):
    from peft import LoraConfig, get_peft_model

    lora = spec.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise RecipeError(f"distill.lora.target_modules: {one_line(e)}") from None


def check_features(teacher, student: PreTrainedModel, source: str | None, spec: DistillSpec) -> list[str]:
    """The student's module paths of the sites, or a RecipeError when the feature term cannot be taken."""
    if getattr(teacher, "saes", None) is None or source is None:
        raise RecipeError("distill.features: > 0 needs a merged teacher whose SAEs read a source of the student's "
                          "kind; expected 0 for this teacher")
    paths, hidden = teacher.layers[source], student.get_input_embeddings().weight.shape[1]
    for site, path in enumerate(paths):
        d_in = teacher.saes[site][source].W_enc.shape[0]
        try:
            student.get_submodule(path)
        except AttributeError:
            raise RecipeError(f"distill.features: the student has no module '{path}' (site {site} of '{source}'); "
                              "expected a student with the merge's sites, or features: 0") from None
        if hidden != d_in:
            raise RecipeError(f"distill.features: the student is {hidden} wide and the SAE of '{source}' at "
                              f"'{path}' reads {d_in}; expected equal widths, or features: 0")
    return paths


def default_top_k(spec: DistillSpec, vocabulary: int) -> int | None:
    if spec.top_k is not None:
        return spec.top_k
    return None if vocabulary <= FULL_VOCABULARY else AUTO_TOP_K


def distill_settings(recipe: Recipe, spec: DistillSpec) -> dict:
    """What a resumed run must share with the interrupted one; lr, logging, checkpoints and output may change."""
    settings = recipe.model_dump(mode="json", include={"models", "data", "merge"})
    settings["seed"] = recipe.train.seed
    settings["distill"] = spec.model_dump(mode="json", exclude={"lr", "log_every", "checkpoint_every", "output"})
    settings["data"].pop("cache")
    return settings


def default_output(recipe: Recipe, merged: str | Path | None = None) -> Path:
    spec = recipe.distill or DistillSpec()
    return Path(spec.output) if spec.output else Path(f"{Path(merged or recipe.output)}-distilled")


def check_output(output: Path, overwrite: bool, resume: bool) -> None:
    """Before any work: the student's folder must be new (or --overwrite), a checkpoint continued or cleared."""
    checkpoint = checkpoint_folder(output)
    if output.exists() and not overwrite:
        raise UserError(f"distill.output: '{output}' already exists; expected a new folder (or pass --overwrite)")
    if (checkpoint / STATE).is_file() and not (resume or overwrite):
        raise UserError(f"distill.output: an interrupted distillation left a checkpoint at '{checkpoint}'; pass "
                        "--resume to continue it or --overwrite to start over")
    if resume and not (checkpoint / STATE).is_file():
        raise UserError(f"--resume: no checkpoint in '{checkpoint}'; expected one left by an interrupted "
                        "distillation into this output folder")


@torch.no_grad()
def held_out_loss(model, batch) -> float:
    """Next-token loss on one batch, in eval mode (no dropout); the model's mode is restored."""
    device, training = model.get_output_embeddings().weight.device, model.training
    ids, labels = (x.to(device) for x in batch)
    model.eval()
    logits = model(ids).logits[:, :-1]
    model.train(training)
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100).item()


def plot_distillation(log_path: Path, teacher_loss: float, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    held = [r for r in rows if "held_out_loss" in r]
    left.plot([r["tokens"] for r in held], [r["held_out_loss"] for r in held], marker="o", label="student")
    left.axhline(teacher_loss, color="k", linestyle="--", label="teacher")
    left.set_title("held-out next-token loss")
    trained = [r for r in rows if "kd" in r]  # the first row is the student before training
    right.plot([r["tokens"] for r in trained], [r["kd"] for r in trained], label="T^2 KL to the teacher")
    right.plot([r["tokens"] for r in trained], [r["ce"] for r in trained], label="next-token loss")
    if any("features" in r for r in trained):
        right.plot([r["tokens"] for r in trained], [r["features"] for r in trained], label="feature term")
    right.set_title("training terms")
    for ax in (left, right):
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def distill(teacher, recipe: Recipe, tokenizer, output: str | Path | None = None, *, overwrite: bool = False,
            resume: bool = False, progress: bool = True, evaluate_after: bool = True, allow_pickle: bool = False,
            teacher_name: str | None = None) -> Path:
    """Train the student `recipe.distill` names on `teacher`'s next-token distribution; write it to `output`
    (default: `distill.output`, else the merge's output + `-distilled`) as a plain model folder with its tokenizer,
    distill.json, distill_log.jsonl, distill_curves.png and a model card; evaluate it on `eval.tasks`.

    A checkpoint beside the output is written every `distill.checkpoint_every` steps and on SIGINT/SIGTERM;
    `resume` continues from it. `teacher` is a merged model (or any causal LM with the tokenizer's vocabulary when
    the student is not a source and `features` is 0); it is not changed."""
    spec = recipe.distill or DistillSpec()
    output = Path(output) if output else default_output(recipe)
    check_output(output, overwrite, resume)
    teacher.eval()
    student, source = build_student(teacher, recipe, spec, tokenizer, allow_pickle)
    paths = check_features(teacher, student, source, spec) if spec.features else []
    if spec.lora is not None:
        student = with_lora(student, spec)
    top_k = default_top_k(spec, student.get_output_embeddings().weight.shape[0])

    seq_len = recipe.data.seq_len
    batch_size = max(1, spec.batch_tokens // seq_len)
    steps = max(1, math.ceil(spec.tokens / (batch_size * seq_len)))
    data = recipe.data.model_copy(update={"datasets": spec.datasets}) if spec.datasets else recipe.data
    where = "distill" if spec.datasets else "data"
    held_out = next(labelled_batches(data, tokenizer, batch_size, recipe.train.seed + 4, where))
    teacher_loss = held_out_loss(teacher, held_out)

    params = [p for p in student.parameters() if p.requires_grad]
    named = {n: p for n, p in student.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(params, lr=spec.lr)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else lr_factor(s - warmup, max(1, steps - warmup)))
    checkpoint, settings = checkpoint_folder(output), distill_settings(recipe, spec)
    start, seconds = 0, 0.0
    if resume:
        state, tensors = checkpoint_io.load(checkpoint, settings, may_change="distill.lr, distill.log_every, "
                                            "distill.checkpoint_every and distill.output")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(tensors[f"param.{name}"])
        checkpoint_io.restore_optimizer(state, tensors, optimizer, schedule, spec.lr)
        start, seconds = state["step"], state.get("seconds", 0.0)
    else:
        shutil.rmtree(checkpoint, ignore_errors=True)
        torch.manual_seed(recipe.train.seed)
    batches = itertools.islice(labelled_batches(data, tokenizer, batch_size, recipe.train.seed + 3, where), start, None)

    checkpoint.mkdir(parents=True, exist_ok=True)
    # Rows are numbered by steps done, so the row of the checkpoint's own step is kept.
    log = TrainingLog(checkpoint / "distill_log.jsonl", start + 1 if start else 0)
    device = student.get_output_embeddings().weight.device
    if start == 0:  # the student before training: the first row, which a resumed run keeps
        log.write({"step": 0, "tokens": 0, "held_out_loss": held_out_loss(student, held_out)})
    bar = tqdm(range(start, steps), desc="distilling", disable=not progress, unit="step", initial=start, total=steps)
    began = time.perf_counter() - seconds

    def save_checkpoint(step: int) -> None:
        tensors = {f"param.{n}": p for n, p in named.items()}
        checkpoint_io.write(checkpoint, step, tensors, optimizer, schedule, settings,
                            seconds=time.perf_counter() - began)

    with StopRequests() as stop:
        for step in bar:
            ids, labels = (x.to(device) for x in next(batches))
            teacher_logits = None
            if spec.ce_weight < 1:  # the teacher is not run when nothing reads its distribution
                with torch.no_grad():
                    teacher_logits = teacher(ids).logits
            codes = merged_codes(teacher, ids) if spec.features else None
            with ResidualHooks(student, paths) as hooks:
                logits = student(input_ids=ids).logits
            terms = distillation_loss(logits, teacher_logits, labels, spec, top_k)
            del teacher_logits
            if codes is not None:
                terms["features"] = feature_loss(teacher, source, hooks.captured, codes)
                terms["loss"] = terms["loss"] + spec.features * terms["features"]
            if not torch.isfinite(terms["loss"]):
                raise TrainingDiverged(f"distill: the loss became {terms['loss'].item()} at step {step}; stopped "
                                       "before saving anything non-finite. Expected a finite loss: lower distill.lr")
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}")
            done = step + 1
            if done % spec.log_every == 0 or done == steps:
                row = {"step": done, "tokens": done * batch_size * seq_len, "lr": schedule.get_last_lr()[0],
                       **{k: v.item() for k, v in terms.items()}}
                row["held_out_loss"] = held_out_loss(student, held_out)
                log.write(row)
            every = spec.checkpoint_every
            if stop.signal or (every and done % every == 0 and done < steps):
                save_checkpoint(done)
            if stop.signal:
                raise TrainingInterrupted(f"{stop.signal} at step {done} of {steps} of distillation; checkpoint in "
                                          f"'{checkpoint}' (`saemerge distill MERGED_DIR --resume`)")
    log.close()
    seconds = time.perf_counter() - began
    save_checkpoint(steps)  # a crash while saving resumes here, not from scratch

    student.eval()
    if spec.lora is not None:
        student = student.merge_and_unload()
    first = json.loads((checkpoint / "distill_log.jsonl").read_text().splitlines()[0])
    metrics = {"teacher": teacher_name or recipe.name, "student": spec.student or recipe.merge.target,
               "steps": steps, "tokens": steps * batch_size * seq_len, "top_k": top_k,
               "trained_parameters": sum(p.numel() for p in params), "seconds": round(seconds, 1),
               "held_out": {"tokens": int((held_out[1][:, 1:] != -100).sum()), "teacher_loss": teacher_loss,
                            "student_loss_before": first["held_out_loss"],
                            "student_loss_after": held_out_loss(student, held_out)}}
    save_student(student, tokenizer, recipe, metrics, checkpoint, output, overwrite)
    if evaluate_after and recipe.eval.tasks:
        evaluate(student, tokenizer, recipe.eval.tasks, recipe.eval.include_path, recipe.eval.limit,
                 recipe.eval.batch_size, output=output / "eval_results.json", max_length=recipe.eval.max_length)
        write_model_card(output, repo_id=output.name)
    return output


def save_student(student, tokenizer, recipe: Recipe, metrics: dict, checkpoint: Path, output: Path,
                 overwrite: bool) -> None:
    """The student's folder, written whole or not at all; then the checkpoint goes."""
    with new_folder(output, overwrite) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(recipe_yaml(recipe))
        (tmp / "distill.json").write_text(json.dumps(metrics, indent=2))
        shutil.copy(checkpoint / "distill_log.jsonl", tmp / "distill_log.jsonl")
        plot_distillation(tmp / "distill_log.jsonl", metrics["held_out"]["teacher_loss"], tmp / "distill_curves.png")
        write_model_card(tmp, repo_id=output.name)
    shutil.rmtree(checkpoint, ignore_errors=True)


class ResidualHooks:
    """Capture the residual at each of `paths` of `model` (none: nothing), gradients kept."""

    def __init__(self, model, paths: list[str]):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.hooks = [ResidualHook(base, path, "capture") for path in paths]

    def __enter__(self):
        for hook in self.hooks:
            hook.attach()
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.detach()

    @property
    def captured(self) -> list[torch.Tensor]:
        return [hook.captured for hook in self.hooks]
