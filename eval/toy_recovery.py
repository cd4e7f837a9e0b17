"""Toy data with a ground truth: do saemerge's SAEs find the true features, and does data initialisation help?

    python eval/toy_recovery.py [--quick] [--out eval/results/toy_recovery]

Activations come from known sparse features (saemerge.toy.ToyFeatures: random unit directions, more features
than dimensions, power-law frequencies, correlated groups, magnitudes uniform(0, 1)), as in Sharkey, Braun and
Millidge, "Taking features out of superposition with sparse autoencoders" (LessWrong, 2022). TopK SAEs are trained
with saemerge's own trainer (train_saes, one site, one source, every setting but those below at its defaults) on
fresh samples every step, and scored by the report's MMCS: each true feature's best cosine with a decoder row,
averaged (saemerge.toy.recovery).

(a) MMCS over training steps, `init: random` against `init: data`, at 0.5x, 1x, 2x and 4x the true number of
    features, 3 seeds each (a seed fixes the true dictionary, the data and the SAE's initialisation, so the two
    inits of one seed see the same data); medians over seeds, and the steps each init needs to reach MMCS 0.9 and
    0.95 (first logged step at or above it, median over seeds; speed-up = random init's steps / data init's).
(b) The report's estimate of how many features there are, without the truth: dictionaries of growing size
    (n_true/4 .. 4 n_true, init: data), each compared with the next larger one (MMCS of the smaller's rows against
    the larger's, median over seeds). Dictionaries smaller than the truth learn true features, which the larger one
    also has; past the truth the extra rows are not true features, and they differ between dictionaries, so the
    agreement drops. Two readings of the curve: the size before its largest drop (the rule fixed before the first
    run) and its peak (read off the first run, seeds 0-2; `--first-seed 3` checks it on other seeds).
(c) Harder settings (more superposition; stronger correlation), at 2x, both inits: where recovery breaks.

Writes toy_recovery.json (every curve), toy_recovery.md (the tables) and toy_recovery.png beside --out. The
default run took 10-14 minutes on one core of a busy 2-core machine, --quick under a minute (fewer steps, sizes
and seeds: its numbers are a smoke test, not results).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saemerge import LatentSpec, TrainSpec, train_saes
from saemerge.files import write_atomic
from saemerge.toy import ToyFeatures, recovery

REPO = Path(__file__).resolve().parent.parent
SETTING = {"d_in": 32, "n_features": 128, "active": 3.0, "zipf": 1.0, "correlation": 0.3, "group": 4, "noise": 0.0}
HARDER = {"more superposition (512 features in 32 dimensions)": {**SETTING, "n_features": 512},
          "strong correlation (0.9 within groups of 4)": {**SETTING, "correlation": 0.9}}
THRESHOLDS = (0.9, 0.95)


def run(setting: dict, size: int, init: str, seed: int, args) -> dict:
    """Train one TopK SAE on fresh toy samples; its MMCS against the truth every `args.every` steps."""
    toy = ToyFeatures(**setting, seed=seed)
    data = torch.Generator().manual_seed(seed + 1)
    batches = ([{"toy": toy.sample(args.batch, data)}] for _ in itertools.count())
    curve = []

    def on_step(step: int, saes) -> None:
        if step % args.every == 0 or step == args.steps:
            r = recovery(saes[0]["toy"], toy)
            curve.append([step, round(r["mmcs"], 4), round(r["recovered"], 4)])

    start = time.perf_counter()
    saes, _ = train_saes(batches, LatentSpec(size=size, activation="topk", k=args.k, init=init),
                         TrainSpec(batch_tokens=args.batch, lr=args.lr, seed=seed, device="cpu"), args.steps,
                         progress=False, on_step=on_step)
    sae = saes[0]["toy"]
    final = recovery(sae, toy)
    return {"size": size, "init": init, "seed": seed, "curve": curve, "mmcs": final["mmcs"],
            "recovered": final["recovered"], "chance": final["chance"],
            "learned_to_truth": recovery(toy.dictionary, sae)["mmcs"],  # are the learned rows true features?
            "seconds": round(time.perf_counter() - start, 1), "decoder": sae.W_dec.detach().clone()}


def steps_to(curve: list, threshold: float) -> int | None:
    return next((step for step, mmcs, _ in curve if mmcs >= threshold), None)


def median_or_none(values: list) -> float | None:
    """Median over seeds; None when some seed never got there (then the median would hide it)."""
    return None if not values or None in values else statistics.median(values)


def summarise(runs: list[dict]) -> list[dict]:
    """Per (size, init): median final numbers and steps to each threshold, and the median curve over seeds."""
    rows = []
    for (size, init), group in itertools.groupby(sorted(runs, key=lambda r: (r["size"], r["init"])),
                                                 key=lambda r: (r["size"], r["init"])):
        group = list(group)
        steps = [p[0] for p in group[0]["curve"]]
        rows.append({"size": size, "init": init, "seeds": len(group),
                     "mmcs": statistics.median(r["mmcs"] for r in group),
                     "recovered": statistics.median(r["recovered"] for r in group),
                     "learned_to_truth": statistics.median(r["learned_to_truth"] for r in group),
                     **{f"steps_to_{t}": median_or_none([steps_to(r["curve"], t) for r in group]) for t in THRESHOLDS},
                     "median_curve": [[s, statistics.median(r["curve"][i][1] for r in group)]
                                      for i, s in enumerate(steps)]})
    for row in rows:  # data init's speed-up over random init (the baseline) at the same size
        if row["init"] == "data":
            base = next(r for r in rows if r["size"] == row["size"] and r["init"] == "random")
            for t in THRESHOLDS:
                ours, theirs = row[f"steps_to_{t}"], base[f"steps_to_{t}"]
                row[f"speedup_{t}"] = theirs / ours if ours and theirs else None
    return rows


def estimates(sizes: list[int], values: list[float]) -> dict:
    """Two readings of an agreement curve: the size before its largest drop (the rule fixed before the first run)
    and the size where it peaks (read off the first run's curve, so checked on other seeds: see the README)."""
    drops = [a - b for a, b in itertools.pairwise(values)]
    return {"largest_drop": sizes[max(range(len(drops)), key=drops.__getitem__)] if drops else None,
            "peak": sizes[max(range(len(values)), key=values.__getitem__)]}


def agreement(runs: list[dict], sizes: list[int], n_true: int) -> dict:
    """(b): each size's MMCS against the next larger size (same seed), the median over seeds, and the estimates
    from the median curve and from each seed's curve."""
    by = {(r["size"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    rows = []
    for small, large in itertools.pairwise(sizes):
        values = [recovery(by[large, s]["decoder"], by[small, s]["decoder"])["mmcs"] for s in seeds]
        rows.append({"size": small, "next": large, "agreement": statistics.median(values), "per_seed": values,
                     "truth_mmcs": statistics.median(by[small, s]["mmcs"] for s in seeds),
                     "learned_to_truth": statistics.median(by[small, s]["learned_to_truth"] for s in seeds)})
    small = [r["size"] for r in rows]
    return {"rows": rows, "estimate": estimates(small, [r["agreement"] for r in rows]),
            "per_seed_estimates": {s: estimates(small, [r["per_seed"][i] for r in rows]) for i, s in enumerate(seeds)},
            "truth": n_true, "seeds": seeds}


def fmt(x, spec=".3f", none="not reached") -> str:
    return none if x is None else format(x, spec)


def markdown(result: dict) -> str:
    a, b, s = result["a"], result["b"], result["setting"]
    lines = ["# Toy data with ground truth: recovery of the true features", "",
             (f"Setting: {s['n_features']} true features in {s['d_in']} dimensions, {s['active']} on per sample on "
              f"average, power-law frequencies (exponent {s['zipf']}), correlation {s['correlation']} within groups of "
              f"{s['group']}, noise {s['noise']}. TopK SAEs, k={result['k']}, {result['steps']} steps of "
              f"{result['batch']} fresh samples, lr {result['lr']}; {result['seeds']} seeds, medians. MMCS: each true "
              "feature's best cosine with a decoder row, averaged; recovered: true features with a cosine > 0.9. "
              f"Steps to a threshold: first logged step (every {result['every']}) at or above it, median over seeds "
              "('not reached' if some seed never got there)."), "",
             "## (a) Random against data initialisation", "",
             ("| latents | init | MMCS | recovered | learned->truth | steps to 0.9 | steps to 0.95 | speed-up to 0.9 "
              "| speed-up to 0.95 |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in a:
        lines.append(f"| {r['size']} | {r['init']} | {r['mmcs']:.3f} | {r['recovered']:.1%} | "
                     f"{r['learned_to_truth']:.3f} | {fmt(r['steps_to_0.9'], 'g')} | {fmt(r['steps_to_0.95'], 'g')} | "
                     + (f"{fmt(r['speedup_0.9'], '.2f', 'n/a')} | {fmt(r['speedup_0.95'], '.2f', 'n/a')} |"
                        if r["init"] == "data"
                        else "(baseline) | (baseline) |"))
    lines += ["", ("Speed-up: random init's steps to the threshold divided by data init's, same size (above 1: data "
                   "init is faster). learned->truth: each learned row's best cosine with a true feature, averaged "
                   "(below 1 when the dictionary has rows that are no true feature)."), "",
              "## (b) How many features? Agreement between dictionaries of growing size", "",
              "| latents | next size | agreement (MMCS against the next) | MMCS with the truth | learned->truth |",
              "|---|---|---|---|---|"]
    for r in b["rows"]:
        lines.append(f"| {r['size']} | {r['next']} | {r['agreement']:.3f} | {r['truth_mmcs']:.3f} | "
                     f"{r['learned_to_truth']:.3f} |")
    each = "; ".join(f"seed {s}: {e['peak']} / {e['largest_drop']}" for s, e in b["per_seed_estimates"].items())
    lines += ["", (f"Estimates from the median curve: its peak {b['estimate']['peak']}, the size before its largest "
                   f"drop {b['estimate']['largest_drop']}; true number: {b['truth']}. Per seed (peak / largest "
                   f"drop): {each}."), "", "## (c) Harder settings (2x latents)", "",
              "| setting | init | MMCS | recovered | steps to 0.9 | steps to 0.95 |", "|---|---|---|---|---|---|"]
    for name, rows in result["c"].items():
        for r in rows:
            lines.append(f"| {name} | {r['init']} | {r['mmcs']:.3f} | {r['recovered']:.1%} | "
                         f"{fmt(r['steps_to_0.9'], 'g')} | {fmt(r['steps_to_0.95'], 'g')} |")
    lines += ["", f"Run: `{result['command']}`, {result['seconds']:.0f} s on {result['machine']}.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    colors = dict(zip(sorted({r["size"] for r in result["a"]}), plt.cm.viridis([0.0, 0.3, 0.6, 0.85])))
    for r in result["a"]:
        x, y = zip(*r["median_curve"])
        ax.plot(x, y, color=colors[r["size"]], linestyle="-" if r["init"] == "data" else "--",
                label=f"{r['size']} latents, {r['init']} init")
    ax.set(xlabel="training step", ylabel="MMCS with the true features", ylim=(0, 1.02),
           title=f"(a) recovery, {result['setting']['n_features']} true features (median of {result['seeds']} seeds)")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    b = result["b"]
    sizes = [r["size"] for r in b["rows"]]
    ax.plot(sizes, [r["agreement"] for r in b["rows"]], "o-", label="MMCS against the next larger dictionary")
    ax.plot(sizes, [r["truth_mmcs"] for r in b["rows"]], "s:", label="MMCS of the truth against it")
    ax.plot(sizes, [r["learned_to_truth"] for r in b["rows"]], "^:", label="its rows against the truth")
    ax.axvline(b["truth"], color="k", linestyle="--", label=f"true number ({b['truth']})")
    ax.axvline(b["estimate"]["peak"], color="r", alpha=0.5, label=f"peak of agreement ({b['estimate']['peak']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(x) for x in sizes])
    ax.minorticks_off()
    ax.set(xlabel="dictionary size (latents)", ylabel="MMCS", ylim=(0.5, 1.0), title="(b) agreement vs size")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[2]
    for (name, rows), color in zip(result["c"].items(), ["C1", "C3"]):
        for r in rows:
            x, y = zip(*r["median_curve"])
            ax.plot(x, y, color=color, linestyle="-" if r["init"] == "data" else "--",
                    label=f"{name.split(' (')[0]}, {r['init']} init")
    ax.set(xlabel="training step", ylabel="MMCS with the true features", ylim=(0, 1.02),
           title="(c) harder settings, 2x latents")
    ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: fewer steps, sizes and seeds")
    parser.add_argument("--out", default=str(REPO / "eval/results/toy_recovery"),
                        help="output stem: writes STEM.json, STEM.md, STEM.png")
    parser.add_argument("--steps", type=int, default=None, help="training steps per SAE (default 1000; quick 300)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3; quick 1)")
    parser.add_argument("--batch", type=int, default=512, help="fresh toy samples per step")
    parser.add_argument("--k", type=int, default=4, help="TopK's k (the setting has 3 features on on average)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--every", type=int, default=10, help="steps between MMCS measurements")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed + 1, ...")
    args = parser.parse_args()
    args.steps = args.steps or (300 if args.quick else 1000)
    args.seeds = args.seeds or (1 if args.quick else 3)
    n = SETTING["n_features"]
    sizes_a = [n, 2 * n] if args.quick else [n // 2, n, 2 * n, 4 * n]
    sizes_b = [n // 2, n, 2 * n] if args.quick else [n // 4, 3 * n // 8, n // 2, 3 * n // 4, n, 3 * n // 2, 2 * n,
                                                      3 * n, 4 * n]
    harder = dict(list(HARDER.items())[:1]) if args.quick else HARDER
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = [("a", SETTING, size, init, seed) for size in sizes_a for init in ("random", "data") for seed in seeds]
    jobs += [("b", SETTING, size, "data", seed) for size in sizes_b if size not in sizes_a for seed in seeds]
    jobs += [(name, setting, 2 * n, init, seed) for name, setting in harder.items() for init in ("random", "data")
             for seed in seeds]
    start = time.perf_counter()
    runs = {}
    for part, setting, size, init, seed in tqdm(jobs, desc="toy SAEs", unit="SAE"):
        runs.setdefault(part, []).append(run(setting, size, init, seed, args))
    b_runs = runs.get("b", []) + [r for r in runs["a"] if r["init"] == "data" and r["size"] in sizes_b]
    result = {"setting": SETTING, "k": args.k, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "every": args.every, "seeds": args.seeds, "first_seed": args.first_seed, "quick": args.quick,
              "a": summarise(runs["a"]), "b": agreement(b_runs, sizes_b, n),
              "c": {name: summarise(runs[name]) for name in harder}, "harder_settings": harder,
              "runs": [{k: v for k, v in r.items() if k != "decoder"} | {"part": part}
                       for part, rs in runs.items() for r in rs],
              "seconds": time.perf_counter() - start,
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} thread(s)",
              "command": "python eval/toy_recovery.py" + (" --quick" if args.quick else "")
                         + (f" --first-seed {args.first_seed}" if args.first_seed else "")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, out.with_suffix(".png"))
    write_atomic(out.with_suffix(".md"), markdown(result))
    write_atomic(out.with_suffix(".json"), json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
