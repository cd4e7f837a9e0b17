#!/usr/bin/env python3
"""Circuit search benchmark: the smallest feature circuit that keeps the brackets behaviour (")" vs "]" where the
code opened the matching bracket), greedy attribution against ACDC-style pruning of the features, and ACDC-style
pruning of heads and MLPs for comparison. Prompts: windows of eval/data/code validation text, half searched on,
half held out.

    python eval/circuit_benchmark.py --pair zoo      # out/dictionaries-zoo-code (recipes/dictionaries-zoo-code.yaml)
    python eval/circuit_benchmark.py --pair gemma    # out/dictionaries-gemma3-270m (its recipe), a time budget

Writes eval/results/circuit_<pair>.{json,md,png}: the `saemerge circuit` report plus the benchmark's lines (size
and % of features at faithfulness >= target on the search and held-out prompts, wall times, the goal: a circuit at
>= 0.8 under 5% of the features, found faster than the ACDC-style search).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from saemerge.circuits import find_circuit, plot, summary  # noqa: E402
from saemerge.files import write_atomic  # noqa: E402

PAIRS = {  # Gemma forwards take ~1 s on a CPU: fewer, shorter prompts and a budget for the ACDC-style search
    "zoo": {"dictionaries": "out/dictionaries-zoo-code", "prompts": 128, "window": 32, "max_seconds": 3600},
    "gemma": {"dictionaries": "out/dictionaries-gemma3-270m", "prompts": 48, "window": 24, "max_seconds": 1200},
}
DATA = "eval/data/code/validation.jsonl.gz"


def goal_lines(report: dict) -> list[str]:
    m, target = report["methods"], report["settings"]["target"]
    if "attribution" not in m:
        return []
    a = m["attribution"]
    lines = ["", "## Benchmark", "",
             "| | features | % of all | faithfulness |", "|---|---|---|---|",
             f"| attribution circuit, searched to {target} on the search prompts | {a['size']} | "
             f"{100 * a['fraction']:.2f}% | {a['faithfulness']:.3f} (held out {a['held_out_faithfulness']:.3f}) |",
             f"| same ranking, smallest reaching {target} on the held-out prompts | {a['held_out_size']['size']} | "
             f"{100 * a['held_out_size']['fraction']:.2f}% | {a['held_out_size']['faithfulness']:.3f} (held out) |"]
    if "acdc" in m:
        c = m["acdc"]
        lines.append(f"| ACDC-style, tau {report['settings']['tau']}{'' if c['finished'] else ' (unfinished)'} | "
                     f"{c['size']} | {100 * c['fraction']:.2f}% | {c['faithfulness']:.3f} "
                     f"(held out {c['held_out_faithfulness']:.3f}) |")
    lines += ["", "Wall time: " + ", ".join(f"{name} {r['seconds']:.0f} s ({r['forwards']} forwards"
                                            + ("" if r.get("finished", True) else ", unfinished") + ")"
                                            for name, r in m.items())
              + f"; shared setup (loading, means, m(full), m(empty)) {report['setup_seconds']:.0f} s."]
    small = a["faithfulness"] >= 0.8 and a["fraction"] < 0.05
    faster = "acdc" in m and a["seconds"] < m["acdc"]["seconds"]
    lines.append(f"Goal (faithfulness >= 0.8 at under 5% of the features, found faster than the ACDC-style search): "
                 f"{'met' if small and faster else 'not met'} ({a['faithfulness']:.3f} at {100 * a['fraction']:.2f}% "
                 f"in {a['seconds']:.0f} s" + ("" if "acdc" not in m else f" vs {m['acdc']['seconds']:.0f} s" + (
                     "" if m["acdc"]["finished"] else ", when the ACDC-style search stopped unfinished")) + ").")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=PAIRS, default="zoo")
    parser.add_argument("--prompts", type=int, help="prompts in all, half held out (default: the pair's)")
    parser.add_argument("--max-seconds", type=float, help="budget of each ACDC-style search (default: the pair's)")
    parser.add_argument("--tau", type=float, default=0.005)
    parser.add_argument("--methods", default="attribution,acdc,components")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    pair = PAIRS[args.pair]
    report = find_circuit(REPO / pair["dictionaries"], "brackets", data=REPO / DATA,
                          prompts=args.prompts or pair["prompts"], window=pair["window"], methods=args.methods,
                          tau=args.tau, max_seconds=args.max_seconds or pair["max_seconds"], progress=not args.quiet)
    report["dictionaries"], report["behaviour"]["source"] = pair["dictionaries"], DATA  # paths relative to the repo
    results = REPO / "eval/results"
    write_atomic(results / f"circuit_{args.pair}.json", json.dumps(report, indent=1, allow_nan=False))
    text = summary(report) + "\n".join(goal_lines(report)) + "\n"
    write_atomic(results / f"circuit_{args.pair}.md", text)
    plot(report, results / f"circuit_{args.pair}.png")
    print(text)


if __name__ == "__main__":
    main()
