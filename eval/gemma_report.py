"""Table, goals and plot from eval/results/gemma_merge.json (called by gemma_merge.py).

    python eval/gemma_report.py eval/results/gemma_merge.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from seed_report import loss_table, save_report

SAE = "SAE merge (the recipe: router + gates, calibrated)"
SOURCES = {"prose": "general alone (Gemma-3-270m GGUF)", "code": "code alone (GGUF + LoRA)"}


def goals(rows: dict) -> list[str]:
    """The issue's goal: the SAE merge below every mergekit method and the logit ensemble on the mixture, and
    within 2% of each source on that source's own domain (general: prose, code specialist: code)."""
    r = rows[SAE]
    lines = ["| goal | SAE merge | baseline | met |", "|---|---|---|---|"]
    for name, b in rows.items():
        if b["group"] in ("mergekit", "baseline"):
            met = r["mix"]["loss"] < b["mix"]["loss"]
            lines.append(f"| mixture below {name} | {r['mix']['loss']:.3f} | {b['mix']['loss']:.3f} | {'yes' if met else 'no'} |")
    for domain, name in SOURCES.items():
        if name in rows:
            ratio = r[domain]["loss"] / rows[name][domain]["loss"]
            lines.append(f"| {domain} within 2% of {name} | {r[domain]['loss']:.3f} | {rows[name][domain]['loss']:.3f} "
                         f"| {'yes' if ratio <= 1.02 else 'no'} ({ratio - 1:+.1%}) |")
    return lines


def timings(rows: dict) -> list[str]:
    lines = ["| step | seconds |", "|---|---|"]
    for step, seconds in rows[SAE].get("timings", {}).items():
        lines.append(f"| `saemerge merge`: {step} | {seconds:.0f} |")
    for name, r in rows.items():
        if "merge_seconds" in r:
            lines.append(f"| {name}: mergekit-yaml | {r['merge_seconds']:.0f} |")
    for name, r in rows.items():
        lines.append(f"| {name}: lm-eval | {r.get('eval_seconds', r.get('timings', {}).get('evaluate', 0)):.0f} |")
    return lines


def write_report(json_path: Path) -> Path:
    data = json.loads(Path(json_path).read_text())
    rows = data["rows"]
    tokens = data.get("setup", {}).get("tokens", {})
    lines = ["# Gemma-3-270m general x code specialist (test samples)", "",
             "Loss in nats per token (Gemma's tokenizer) and bits per byte from lm-evaluation-harness "
             "(`loglikelihood_rolling`, windows of 512 tokens) on `saemerge_mix_sample`: "
             + ", ".join(f"{d} {t[1]} tokens / {t[0]} bytes" for d, t in tokens.items())
             + "; the mixture is the mean of the two domains.", ""]
    lines += loss_table(rows) + [""]
    if SAE in rows:
        lines += ["Goals:", ""] + goals(rows) + ["", "Wall time on this machine (2 CPU cores):", ""] + timings(rows) + [""]
        from saemerge.report import sae_table
        for site in rows[SAE].get("sae_metrics", []):
            lines += ["Shared SAEs, layers " + ", ".join(f"{n} `{p}`" for n, p in site["layers"].items()) + ":", "",
                      sae_table(site), ""]
    return save_report(json_path, lines, rows)


if __name__ == "__main__":
    write_report(Path(sys.argv[1]))
