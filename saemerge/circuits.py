"""Circuit search on features: a small set of (site, latent) nodes that keeps a behaviour's metric when every
other feature is mean-ablated.

Nodes are the latents of every site's SAE. Mean ablation puts a node's mean code (over the search prompts' real
tokens, position 0 left out) in place of its code at every position > 0; the SAEs' errors are always kept, so
"all nodes" is the clean model exactly. faithfulness(C) = (m(C) - m(empty)) / (m(full) - m(empty)), m(full) the
clean model, m(empty) every feature mean-ablated.

Three searches:
- attribution: every node's attribution grad . (code - mean), summed over positions and averaged over prompts
  (attribution patching toward the mean), with the gradient averaged over a few points of the path from every
  node at its mean to the clean run (integrated gradients: the plain gradient at the clean run ranks far worse
  once many nodes are ablated together); the top nodes at growing sizes (a doubling grid, then bisection) up to
  the smallest circuit reaching the target; then `refine` rounds that recompute the attribution with that
  circuit in place (everything else ablated) and search again below its size.
- acdc: ACDC-style pruning of the feature graph. Nodes never active on the search prompts are dropped first at no
  cost (their code and their mean are 0: ablating them changes nothing); then, from the deepest site to the
  shallowest, each node is ablated and stays so if the metric moves by at most tau * (m(full) - m(empty)).
- components: the same pruning over attention heads and MLPs of every decoder block of the plain model (heads
  through a pre-hook on the attention output projection's input), with its own m(empty): all components
  ablated. ACDC itself (Conmy et al. 2023) prunes edges with TransformerLens; these are node-level analogues.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .behaviours import Behaviour, PromptBatch, bracket_behaviour, load_behaviour, metric, read_texts
from .dictionaries import Dictionaries, load_dictionaries
from .errors import UserError
from .feature_intervention import code_gradient, mean_codes, run_features
from .files import refuse_existing, write_results
from .hooks import find_blocks

METHODS = ("attribution", "acdc", "components")


def faithfulness(m: float, m_full: float, m_empty: float) -> float | None:
    """(m - m(empty)) / (m(full) - m(empty)); None when the two ends are equal (nothing to keep)."""
    return (m - m_empty) / (m_full - m_empty) if m_full != m_empty else None


def metric_with_hooks(model: nn.Module, batches: list[PromptBatch], handles: list) -> float:
    """The behaviour's metric with the ablation hooks `handles` in place; they are removed whatever happens."""
    try:
        return metric(model, batches)
    finally:
        for handle in handles:
            handle.remove()


def real_positions(batch: PromptBatch) -> torch.Tensor:
    """[batch, seq] 1 on real tokens after position 0: where ablation acts and attribution is summed."""
    keep = batch.mask.clone()
    keep[:, 0] = 0
    return keep


@dataclass
class FeatureAblation:
    """The model with its dictionaries on a fixed prompt set; features outside a circuit take their mean code.
    A circuit is a flat bool mask over all nodes (sites concatenated in their order)."""
    model: nn.Module
    dicts: Dictionaries
    batches: list[PromptBatch]
    means: list[torch.Tensor]  # per site [d_sae]
    forwards: int = 0  # metric evaluations, each a pass over all the prompts

    @property
    def sizes(self) -> list[int]:
        return [sae.cfg.d_sae for sae in self.dicts.saes]

    def metric(self, keep: torch.Tensor | None = None, sites: list[int] | None = None) -> float:
        """m with every node outside `keep` mean-ablated (None: the clean model), hooking only `sites` (default:
        all; a site left out runs clean). What `run_features` computes with the edit z -> where(keep, z, mean),
        written as x + sum over ablated latents of (mean - code) * decoder row: a constant per site minus the
        decoded ablated part of the sparse code, about twice as fast as decoding a dense difference."""
        keep = torch.ones(sum(self.sizes), dtype=torch.bool) if keep is None else keep
        handles = []

        def hook(site: int, ablated: torch.Tensor):
            sae = self.dicts.saes[site]
            constant = (self.means[site] * ablated) @ sae.W_dec * sae.act_scale

            def fn(module, args, output):
                x = output[0] if isinstance(output, tuple) else output
                if sae.cfg.activation == "topk":
                    values, indices = sae.encode_topk(x)
                    removed = sae.decode_topk(values * ablated[indices], indices, bias=False)
                else:
                    removed = sae.decode(sae.encode(x) * ablated, bias=False)
                new = torch.cat([x[:, :1], x[:, 1:] + (constant - removed[:, 1:]).to(x.dtype)], 1)  # not position 0
                return (new, *output[1:]) if isinstance(output, tuple) else new
            return fn

        for site, kept in enumerate(keep.split(self.sizes)):
            if (sites is None or site in sites) and not kept.all():
                module = self.model.get_submodule(self.dicts.paths[site])
                handles.append(module.register_forward_hook(hook(site, (~kept).float())))
        self.forwards += 1
        return metric_with_hooks(self.model, self.batches, handles)

    def attribution(self, keep: torch.Tensor | None = None, steps: int = 1) -> torch.Tensor:
        """Every node's grad . (code - mean), summed over positions > 0 and averaged over prompts, with `keep` in
        place: a first-order estimate of how much m falls if that node alone is mean-ablated (for a node outside
        `keep`: how much m rises if it comes back). `steps` > 1: averaged along the path from every node at its
        mean to `keep` (integrated gradients, a midpoint rule)."""
        total = torch.zeros(sum(self.sizes))
        count = sum(len(b.ids) for b in self.batches) * steps
        kept = None if keep is None else keep.split(self.sizes)

        def on_path(alpha: float):  # every site's codes at mean + alpha * (circuit codes - mean)
            def edit(site, z):
                z = z if kept is None else torch.where(kept[site], z, self.means[site])
                return z if alpha == 1.0 else self.means[site] + alpha * (z - self.means[site])
            return None if kept is None and alpha == 1.0 else edit

        for alpha in [(i + 0.5) / steps for i in range(steps)] if steps > 1 else [1.0]:
            for b in self.batches:
                run = run_features(self.model, self.dicts, b.ids, b.mask, edit=on_path(alpha), grad=True,
                                   logits_to_keep=b.last)
                (b.logit_difference(run.output.logits).sum() / count).backward()
                where = real_positions(b)[..., None]
                parts = [(code_gradient(self.dicts, s, run.deltas[s].grad) * (run.codes[s].detach() - self.means[s])
                          * where).sum((0, 1)) for s in range(len(self.sizes))]
                total += torch.cat(parts)
        return total


def mask_of(nodes: torch.Tensor, total: int) -> torch.Tensor:
    keep = torch.zeros(total, dtype=torch.bool)
    keep[nodes] = True
    return keep


def smallest_reaching(faithfulness, order: torch.Tensor, target: float, largest: int) -> tuple[int, dict]:
    """The smallest k (a doubling grid, then bisection) whose top k of `order` reach `target`, or `largest` if none
    smaller does; and {k: faithfulness} of every k tried."""
    curve = {}

    def reaches(k: int) -> bool:
        if k not in curve:
            curve[k] = faithfulness(mask_of(order[:k], len(order)))
        return curve[k] >= target

    low, high = 0, 1
    while high < largest and not reaches(high):
        low, high = high, min(2 * high, largest)
    if not reaches(high):
        return largest, curve
    while high - low > 1:  # low fails (or is 0), high reaches
        middle = (low + high) // 2
        low, high = (low, middle) if reaches(middle) else (middle, high)
    return high, curve


def attribution_search(ablation: FeatureAblation, m_full: float, m_empty: float, active: torch.Tensor,
                       target: float, refine: int = 3, steps: int = 4) -> dict:
    """Greedy by attribution (`steps` of integrated gradients from every node at its mean to the clean run): the
    top nodes at growing sizes, to the smallest circuit reaching `target`; then up to `refine` rounds: the
    attribution again with that circuit in place (from every node at its mean to it), and the same search below
    its size."""
    start, forwards = time.perf_counter(), ablation.forwards
    faith = lambda keep: faithfulness(ablation.metric(keep), m_full, m_empty)
    order = ablation.attribution(steps=steps).masked_fill(~active, -math.inf).argsort(descending=True)
    size, curve = smallest_reaching(faith, order, target, int(active.sum()))
    best, rounds = (order, size, curve[size]), []
    for _ in range(refine if size > 1 else 0):
        scores = ablation.attribution(mask_of(order[:size], len(active)), steps)
        order = scores.masked_fill(~active, -math.inf).argsort(descending=True)
        size, tried = smallest_reaching(faith, order, target, best[1] - 1)
        rounds.append({"size": size, "curve": sorted(tried.items())})
        if tried[size] < target:  # nothing smaller reaches it
            break
        best = (order, size, tried[size])
    order, size, reached = best
    return {"keep": mask_of(order[:size], len(active)), "order": order, "faithfulness": reached,
            "curve": sorted(curve.items()), "refine": rounds, "seconds": time.perf_counter() - start,
            "forwards": ablation.forwards - forwards, "gradient_passes": steps * (1 + len(rounds))}


def prune(evaluate, keep: torch.Tensor, order: list[int], scale: float, tau: float,
          max_seconds: float | None = None, progress: bool = True, desc: str = "pruning") -> dict:
    """ACDC-style pruning: visit the nodes of `order`, ablate each and leave it ablated if the metric
    (`evaluate(keep, node)`) moves by at most `tau * scale`. Stops after `max_seconds` (unfinished: the nodes
    not visited stay in)."""
    start = time.perf_counter()
    keep = keep.clone()
    current, forwards, visited = evaluate(keep, order[0]), 1, 0
    for node in tqdm(order, desc=desc, unit="node", disable=not progress, mininterval=2):
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
        keep[node] = False
        value = evaluate(keep, node)
        forwards, visited = forwards + 1, visited + 1
        if abs(value - current) <= tau * abs(scale):
            current = value
        else:
            keep[node] = True
    return {"keep": keep, "metric": current, "visited": visited, "finished": visited == len(order),
            "seconds": time.perf_counter() - start, "forwards": forwards}


def acdc_search(ablation: FeatureAblation, m_full: float, m_empty: float, active: torch.Tensor, tau: float,
                max_seconds: float | None = None, progress: bool = True) -> dict:
    """ACDC-style pruning of the active nodes, from the deepest site to the shallowest. While site s is visited,
    every earlier site has only never-active nodes ablated, a no-op on these prompts: those sites run clean."""
    n_sites = len(ablation.sizes)
    site_of = torch.arange(n_sites).repeat_interleave(torch.tensor(ablation.sizes))
    order = [i for s in reversed(range(n_sites)) for i in (active & (site_of == s)).nonzero().flatten().tolist()]
    evaluate = lambda keep, node: ablation.metric(keep, sites=range(int(site_of[node]), n_sites))
    result = prune(evaluate, active, order, m_full - m_empty, tau, max_seconds, progress, "acdc (features)")
    result["faithfulness"] = faithfulness(result["metric"], m_full, m_empty)
    return result


# --- components: heads and MLPs -----------------------------------------------------------------------------
def _has_linear(module: nn.Module) -> bool:
    return any(type(m).__name__ in ("Linear", "Conv1D") for m in module.modules())


def attention_projection(block: nn.Module) -> nn.Module:
    """The attention's output projection (GPT-2 attn.c_proj, Llama/Gemma/Qwen self_attn.o_proj, NeoX
    attention.dense): the last linear layer of the block's child named *attn* / *attention*; its input is the
    heads' outputs side by side."""
    for name, child in block.named_children():
        if ("attn" in name or "attention" in name) and _has_linear(child):
            return [m for m in child.modules() if type(m).__name__ in ("Linear", "Conv1D")][-1]
    raise UserError(f"--methods components: found no attention module in {type(block).__name__}; expected a "
                    "child named *attn* or *attention* (or leave components out of --methods)")


def mlp_module(block: nn.Module) -> nn.Module:
    for name, child in block.named_children():
        if "mlp" in name and _has_linear(child):
            return child
    raise UserError(f"--methods components: found no MLP in {type(block).__name__}; expected a child named *mlp* "
                    "(or leave components out of --methods)")


class ComponentAblation:
    """The plain model with attention heads and MLPs mean-ablated at positions > 0 (their mean over the real
    tokens of `batches`, or `means` of another ablation). A circuit is a flat bool mask over the components,
    block by block: its heads, then its MLP."""

    def __init__(self, model: nn.Module, batches: list[PromptBatch], means: tuple | None = None):
        self.model, self.batches, self.forwards = model, batches, 0
        blocks = find_blocks(model)[1]
        self.heads = model.config.get_text_config().num_attention_heads
        self.projections = [attention_projection(b) for b in blocks]
        self.mlps = [mlp_module(b) for b in blocks]
        self.total = len(blocks) * (self.heads + 1)
        self.head_means, self.mlp_means = means or self._means()

    @torch.no_grad()
    def _means(self):
        sums = [[0.0, 0.0] for _ in self.projections]
        count, handles, where = 0, [], {}

        def capture(i, slot):
            def hook(module, args, output=None):
                x = args[0] if output is None else output
                sums[i][slot] = sums[i][slot] + (x.float() * where["real"][..., None]).sum((0, 1))
            return hook

        for i, (p, m) in enumerate(zip(self.projections, self.mlps)):
            handles += [p.register_forward_pre_hook(capture(i, 0)), m.register_forward_hook(capture(i, 1))]
        try:
            for b in self.batches:
                where["real"] = real_positions(b)
                self.model(input_ids=b.ids, attention_mask=b.mask, logits_to_keep=b.last, use_cache=False)
                count += int(where["real"].sum())
        finally:
            for h in handles:
                h.remove()
        return [s[0] / count for s in sums], [s[1] / count for s in sums]

    def metric(self, keep: torch.Tensor) -> float:
        keep = keep.view(len(self.projections), self.heads + 1)
        handles = []

        def heads(i):
            def hook(module, args):
                x = args[0].clone()
                width = x.shape[-1] // self.heads
                for h in (~keep[i, :self.heads]).nonzero().flatten().tolist():
                    x[:, 1:, h * width:(h + 1) * width] = self.head_means[i][h * width:(h + 1) * width].to(x)
                return (x, *args[1:])
            return hook

        def mlp(i):
            def hook(module, args, output):
                x = output.clone()
                x[:, 1:] = self.mlp_means[i].to(x)
                return x
            return hook

        for i, (p, m) in enumerate(zip(self.projections, self.mlps)):
            if not keep[i, :self.heads].all():
                handles.append(p.register_forward_pre_hook(heads(i)))
            if not keep[i, self.heads]:
                handles.append(m.register_forward_hook(mlp(i)))
        self.forwards += 1
        return metric_with_hooks(self.model, self.batches, handles)


def component_search(model: nn.Module, search: list[PromptBatch], held: list[PromptBatch], tau: float,
                     max_seconds: float | None = None, progress: bool = True) -> dict:
    """ACDC-style pruning of heads and MLPs, from the last block to the first (in a block: MLP, then heads)."""
    start = time.perf_counter()
    ablation = ComponentAblation(model, search)
    n = ablation.total
    full, none = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    m_full, m_empty = ablation.metric(full), ablation.metric(none)
    per_block = ablation.heads + 1
    order = [b * per_block + c for b in reversed(range(n // per_block)) for c in reversed(range(per_block))]
    result = prune(lambda keep, node: ablation.metric(keep), full, order, m_full - m_empty, tau, max_seconds,
                   progress, "acdc (components)")
    result |= {"m_full": m_full, "m_empty": m_empty, "faithfulness": faithfulness(result["metric"], m_full, m_empty),
               "seconds": time.perf_counter() - start, "forwards": ablation.forwards, "total": n,
               "heads": ablation.heads, "blocks": n // per_block}
    held_ablation = ComponentAblation(model, held, (ablation.head_means, ablation.mlp_means))
    h_full, h_empty = held_ablation.metric(full), held_ablation.metric(none)
    result["held_out"] = {"m_full": h_full, "m_empty": h_empty,
                          "faithfulness": faithfulness(held_ablation.metric(result["keep"]), h_full, h_empty)}
    return result


def component_names(keep: torch.Tensor, heads: int) -> list[str]:
    return [f"block {i // (heads + 1)} " + ("mlp" if i % (heads + 1) == heads else f"head {i % (heads + 1)}")
            for i in keep.nonzero().flatten().tolist()]


# --- the command ----------------------------------------------------------------------------------------------
def parse_methods(text: str | list[str]) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()] if isinstance(text, str) else list(text)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--methods: {','.join(bad) or repr(text)} is not a method; expected a comma-separated "
                        f"list of {', '.join(METHODS)}")
    return methods


def make_behaviour(behaviour: str | Path, tokenizer, bos: list[int], data: str | Path | None, prompts: int,
                   window: int, seed: int) -> Behaviour:
    if str(behaviour) == "brackets":
        if data is None:
            raise UserError("--data: missing; expected a .jsonl(.gz) file of code (a \"text\" field) for "
                            "--behaviour brackets")
        return bracket_behaviour(read_texts(data), tokenizer, prompts, window, bos, seed)
    loaded = load_behaviour(behaviour, tokenizer, bos)
    return loaded.subset(range(min(prompts, len(loaded))))


def find_circuit(dict_dir: str | Path, behaviour: str | Path = "brackets", *, data: str | Path | None = None,
                 prompts: int = 128, target: float = 0.8, methods: str | list[str] = METHODS, tau: float = 0.005,
                 max_seconds: float | None = None, refine: int = 3, ig_steps: int = 4, window: int = 32,
                 batch_size: int = 64, seed: int = 0, output: str | Path | None = None, overwrite: bool = False,
                 progress: bool = True, model: nn.Module | None = None) -> dict:
    """Search circuits for `behaviour` ("brackets", from the code text of `data`, or a JSON lines file; see
    behaviours.py) in the dictionaries of `dict_dir`: `prompts` prompts in all, half of them (by `seed`) for the
    search, half held out. `methods`: attribution, acdc, components. With `output`, writes circuit.json,
    circuit.md and circuit.png into that new folder. Returns the report (what circuit.json holds)."""
    methods = parse_methods(methods)
    for arg, value, ok, expected in [("--prompts", prompts, prompts >= 4, "4 or more"),
                                     ("--target", target, 0 < target <= 1, "a number in (0, 1]"),
                                     ("--tau", tau, tau >= 0, "0 or more"),
                                     ("--max-seconds", max_seconds, max_seconds is None or max_seconds > 0, "> 0"),
                                     ("--refine", refine, refine >= 0, "0 or more"),
                                     ("--ig-steps", ig_steps, ig_steps >= 1, "1 or more"),
                                     ("--window", window, window >= 2, "2 or more")]:
        if not ok:
            raise UserError(f"{arg}: {value}; expected {expected}")
    output = None if output is None else Path(output)
    refuse_existing(output, overwrite)
    start = time.perf_counter()
    dicts = load_dictionaries(dict_dir)
    from transformers import AutoTokenizer

    from .data import _bos
    from .sources import load_source, load_tokenizer

    folder = Path(dict_dir) / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(folder) if folder.is_dir() else load_tokenizer(dicts.spec)
    bos = _bos(dicts.recipe.data, tokenizer)
    task = make_behaviour(behaviour, tokenizer, bos, data, prompts, window, seed)
    search_prompts, held_prompts = task.split(seed)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    search, held = search_prompts.batches(batch_size, pad), held_prompts.batches(batch_size, pad)
    model = model if model is not None else load_source(dicts.spec)
    model.requires_grad_(False)
    for sae in dicts.saes:
        sae.requires_grad_(False)

    means = mean_codes(model, dicts, [(b.ids, b.mask) for b in search])
    ablation = FeatureAblation(model, dicts, search, means)
    active = torch.cat(means) > 0  # codes are >= 0: a mean of 0 is a node that never fired on these prompts
    total = len(active)
    none = torch.zeros(total, dtype=torch.bool)
    m_full, m_empty = ablation.metric(), ablation.metric(none)
    if not m_full - m_empty > 1e-6 * max(1.0, abs(m_full)):
        raise UserError(f"--behaviour: m(full) {m_full:.4f} is not above m(empty) {m_empty:.4f} (every feature "
                        "mean-ablated); expected a behaviour the model does and its features carry")
    held_ablation = FeatureAblation(model, dicts, held, means)
    h_full, h_empty = held_ablation.metric(), held_ablation.metric(none)
    setup = time.perf_counter() - start

    def describe(keep: torch.Tensor, search_faithfulness: float) -> dict:
        nodes = keep.nonzero().flatten()
        offsets = torch.tensor([0, *ablation.sizes]).cumsum(0)
        site = torch.searchsorted(offsets, nodes, right=True) - 1
        return {"size": len(nodes), "fraction": len(nodes) / total,
                "fraction_of_active": len(nodes) / int(active.sum()),
                "faithfulness": search_faithfulness,
                "held_out_faithfulness": faithfulness(held_ablation.metric(keep), h_full, h_empty),
                "nodes": [[dicts.paths[s], int(n - offsets[s])] for s, n in zip(site.tolist(), nodes.tolist())]}

    results = {}
    if "attribution" in methods:
        found = attribution_search(ablation, m_full, m_empty, active, target, refine, ig_steps)
        results["attribution"] = describe(found["keep"], found["faithfulness"]) | {
            k: found[k] for k in ("seconds", "forwards", "gradient_passes", "curve", "refine")}
        # Reported, not searched with: the smallest top k of the same ranking that reaches the target held out.
        held_faithfulness = lambda keep: faithfulness(held_ablation.metric(keep), h_full, h_empty) or 0.0
        size, curve = smallest_reaching(held_faithfulness, found["order"], target, int(active.sum()))
        results["attribution"]["held_out_size"] = {"size": size, "fraction": size / total,
                                                   "faithfulness": curve[size]}
        size = found["keep"].sum()
        pool = active.nonzero().flatten().tolist()
        chosen = torch.tensor(random.Random(seed).sample(pool, int(size)))
        random_keep = mask_of(chosen, total)
        results["attribution"]["random_same_size"] = {
            "faithfulness": faithfulness(ablation.metric(random_keep), m_full, m_empty),
            "held_out_faithfulness": faithfulness(held_ablation.metric(random_keep), h_full, h_empty)}
    if "acdc" in methods:
        found = acdc_search(ablation, m_full, m_empty, active, tau, max_seconds, progress)
        results["acdc"] = describe(found["keep"], found["faithfulness"]) | {
            k: found[k] for k in ("seconds", "forwards", "finished", "visited")} | {"to_visit": int(active.sum())}
    if "components" in methods:
        found = component_search(model, search, held, tau, max_seconds, progress)
        kept = int(found["keep"].sum())
        results["components"] = {
            "size": kept, "total": found["total"], "fraction": kept / found["total"],
            "faithfulness": found["faithfulness"], "held_out_faithfulness": found["held_out"]["faithfulness"],
            "m_full": found["m_full"], "m_empty": found["m_empty"], "held_out": found["held_out"],
            "seconds": found["seconds"], "forwards": found["forwards"], "finished": found["finished"],
            "visited": found["visited"], "heads_per_block": found["heads"], "blocks": found["blocks"],
            "components": component_names(found["keep"], found["heads"])}

    report = {
        "dictionaries": str(dict_dir), "model": dicts.spec.model, "sites": dicts.paths,
        "behaviour": {"name": task.name, "source": str(data if str(behaviour) == "brackets" else behaviour),
                      "search_prompts": len(search_prompts), "held_out_prompts": len(held_prompts),
                      "prompt_tokens": [min(map(len, task.prompts)), max(map(len, task.prompts))],
                      "examples": [{"prompt": t[-120:], "correct": tokenizer.decode([c]),
                                    "incorrect": tokenizer.decode([i])}
                                   for t, c, i in zip(task.texts[:3], task.correct, task.incorrect)]},
        "settings": {"methods": methods, "target": target, "tau": tau, "max_seconds": max_seconds,
                     "refine": refine, "ig_steps": ig_steps, "window": window, "seed": seed, "prompts": prompts},
        "features": total, "active_features": int(active.sum()),
        "m_full": m_full, "m_empty": m_empty, "held_out": {"m_full": h_full, "m_empty": h_empty},
        "setup_seconds": setup, "methods": results, "seconds": time.perf_counter() - start,
    }
    if output is not None:
        write_results(output, overwrite, "circuit", report, summary(report), plot)
    return report


# --- output -------------------------------------------------------------------------------------------------
def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


LABELS = {"attribution": "greedy attribution", "acdc": "ACDC-style (features)",
          "components": "ACDC-style (heads + MLPs)"}


def summary(report: dict) -> str:
    b, s = report["behaviour"], report["settings"]
    lines = [f"# Circuit search: {b['name']} on {report['model']}", "",
             f"- dictionaries: {report['dictionaries']} ({len(report['sites'])} sites, {report['features']} features, "
             f"{report['active_features']} active on the search prompts)",
             f"- prompts: {b['search_prompts']} search, {b['held_out_prompts']} held out, "
             f"{b['prompt_tokens'][0]}-{b['prompt_tokens'][1]} tokens",
             f"- metric: mean logit(correct) - logit(incorrect) at the last token: clean {report['m_full']:.3f}, "
             f"every feature mean-ablated {report['m_empty']:.3f} (held out: {report['held_out']['m_full']:.3f}, "
             f"{report['held_out']['m_empty']:.3f})",
             f"- faithfulness = (m(C) - m(empty)) / (m(full) - m(empty)); ablation = mean code over the search "
             f"prompts at every position > 0; SAE errors always kept; target {s['target']}, tau {s['tau']}", "",
             "| method | size | % of all | faithfulness (search) | held out | seconds | forwards | finished |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in report["methods"].items():
        unit = "components" if name == "components" else "features"
        lines.append(f"| {LABELS[name]} | {r['size']} {unit} | {100 * r['fraction']:.2f}% | "
                     f"{_number(r['faithfulness'])} | {_number(r['held_out_faithfulness'])} | {r['seconds']:.1f} | "
                     f"{r['forwards']} | "
                     f"{'yes' if r.get('finished', True) else 'no (time budget)'} |")
    if "attribution" in report["methods"]:
        r = report["methods"]["attribution"]
        held, rand = r["held_out_size"], r["random_same_size"]
        lines += ["", f"Attribution: the same ranking reaches {s['target']} on the held-out prompts at {held['size']} "
                      f"features ({100 * held['fraction']:.2f}%); a random circuit of the search circuit's size "
                      "(active features) "
                      f"keeps {_number(rand['faithfulness'])} (held out {_number(rand['held_out_faithfulness'])})."]
    if "components" in report["methods"]:
        r = report["methods"]["components"]
        lines += ["", f"Components: {r['blocks']} blocks x ({r['heads_per_block']} heads + MLP); their own "
                      f"m(empty) (all mean-ablated): {r['m_empty']:.3f}; kept: {', '.join(r['components']) or 'none'}."]
    if "acdc" in report["methods"]:
        r = report["methods"]["acdc"]
        lines += ["", f"ACDC-style: visited {r['visited']} of {r['to_visit']} active features"
                      + ("." if r["finished"] else f" before its {s['max_seconds']:g} s budget ran out; the rest "
                                                   "stay in the circuit.")]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str | Path) -> None:
    """Faithfulness against circuit size (% of all features, or of all components for the baseline), log x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    methods = report["methods"]
    if "attribution" in methods:
        r = methods["attribution"]
        sizes, faith = zip(*r["curve"])
        ax.plot([100 * k / report["features"] for k in sizes], faith, "o-", ms=3,
                label=f"{LABELS['attribution']} ({r['seconds']:.0f} s)")
        for i, round_ in enumerate(r["refine"]):
            sizes, faith = zip(*round_["curve"])
            ax.plot([100 * k / report["features"] for k in sizes], faith, ".--", ms=3, lw=0.8, color="C0",
                    alpha=0.5, label="attribution recomputed with the circuit in place" if i == 0 else None)
        ax.plot([100 * r["fraction"]], [r["faithfulness"]], "o", ms=9, mfc="none", color="C0")
    for name, marker, color in [("acdc", "s", "C1"), ("components", "^", "C2")]:
        if name in methods:
            r = methods[name]
            done = "" if r["finished"] else ", unfinished"
            ax.plot([100 * r["fraction"]], [r["faithfulness"]], marker, ms=9, color=color,
                    label=f"{LABELS[name]} ({r['seconds']:.0f} s{done})")
    ax.axhline(report["settings"]["target"], color="grey", ls="--", lw=0.8)
    ax.axvline(5, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("circuit size, % of all features (baseline: % of heads + MLPs)")
    ax.set_ylabel("faithfulness (search prompts)")
    ax.set_title(f"{report['behaviour']['name']}: {report['model']} ({report['features']} features at "
                 f"{len(report['sites'])} sites)", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
