"""Tables, goals and a plot from eval/results/seed_experiment*.json (called by seed_experiment.py).

    python eval/seed_report.py eval/results/seed_experiment.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ENSEMBLE = "logit ensemble (mean of the two distributions)"
ROUTED = "routed ensemble (learned per-token router, no feature exchange)"


def loss_table(rows: dict) -> list[str]:
    lines = ["| model | group | prose loss | code loss | mixture loss | prose bpb | code bpb | mixture bpb |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['group']} | {r['prose']['loss']:.3f} | {r['code']['loss']:.3f} | "
                     f"**{r['mix']['loss']:.3f}** | {r['prose']['bpb']:.3f} | {r['code']['bpb']:.3f} | {r['mix']['bpb']:.3f} |")
    return lines


def goals_table(rows: dict) -> list[str]:
    """(a) a source's loss on the other domain, alone / merged; (b) the better source's mixture loss / merged."""
    prose, code = rows["prose alone"], rows["code alone"]
    best_mix = min(prose["mix"]["loss"], code["mix"]["loss"])
    lines = ["| merged model | (a) code model on prose: alone / merged | (a) prose model on code: alone / merged | "
             "(b) better source's mixture / merged | mixture below logit ensemble | mixture below routed ensemble | "
             "no worse than the receiving source on its own domain |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if not name.startswith("SAE"):
            continue
        receivers = ["code"] if "-> code" in name else ["prose"] if "-> prose" in name else ["prose", "code"]
        a_code = f"{code['prose']['loss'] / r['prose']['loss']:.2f}x" if "code" in receivers else "-"
        a_prose = f"{prose['code']['loss'] / r['code']['loss']:.2f}x" if "prose" in receivers else "-"
        own = all(r[d]["loss"] <= rows[f"{d} alone"][d]["loss"] for d in receivers)
        beats = {k: ("yes" if k in rows and r["mix"]["loss"] < rows[k]["mix"]["loss"] else "no" if k in rows else "-")
                 for k in (ENSEMBLE, ROUTED)}
        lines.append(f"| {name} | {a_code} | {a_prose} | {best_mix / r['mix']['loss']:.2f}x | {beats[ENSEMBLE]} | "
                     f"{beats[ROUTED]} | {'yes' if own else 'no'} |")
    return lines


def ablation_table(ablation: dict) -> list[str]:
    lines = ["| SAEs | explained variance prose / code | dead latents prose / code | cross EV prose->code | "
             "active-set Jaccard | merge into code, mean: prose / code / mixture | sum: mixture |",
             "|---|---|---|---|---|---|---|"]
    for name, a in ablation.items():
        site = a["sae_metrics"]["sites"][-1]
        s, p = site["sources"], site["pairs"]["prose->code"]
        m = a["mean"]
        sum_cell = f"{a['sum']['mix']['loss']:.3f}" if "sum" in a else "-"
        lines.append(f"| {name} | {s['prose']['explained_variance']:.3f} / {s['code']['explained_variance']:.3f} | "
                     f"{s['prose']['dead_fraction']:.1%} / {s['code']['dead_fraction']:.1%} | "
                     f"{p['cross_explained_variance']:.3f} | {p['active_jaccard']:.3f} | "
                     f"{m['prose']['loss']:.3f} / {m['code']['loss']:.3f} / {m['mix']['loss']:.3f} | "
                     f"{sum_cell} |")
    return lines


def plot(rows: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(names) + 1.2))
    y = range(len(names))
    for domain, marker, color in (("prose", "o", "tab:blue"), ("code", "s", "tab:orange")):
        ax.scatter([rows[n][domain]["loss"] for n in names], y, marker=marker, color=color, label=f"{domain} test", zorder=3)
    ax.barh(list(y), [rows[n]["mix"]["loss"] for n in names], color="lightgray", label="mixture (mean)", zorder=2)
    if ENSEMBLE in rows:
        ax.axvline(rows[ENSEMBLE]["mix"]["loss"], color="tab:red", ls="--", lw=1, label="logit ensemble, mixture")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("held-out loss, nats per token (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def save_report(json_path: Path, lines: list[str], rows: dict) -> Path:
    """The markdown and the plot beside the JSON; the markdown is also printed."""
    md = Path(json_path).with_suffix(".md")
    md.write_text("\n".join(lines))
    plot(rows, Path(json_path).with_suffix(".png"))
    print("\n".join(lines))
    return md


def write_report(json_path: Path) -> Path:
    data = json.loads(Path(json_path).read_text())
    rows = data["rows"]
    lines = [f"# The seed experiment ({data['setup']['split']} split)", "",
             "Loss in nats per token and bits per byte from lm-evaluation-harness (`loglikelihood_rolling`, "
             "context 128); the mixture is the mean of the two domains.", ""]
    lines += loss_table(rows) + [""]
    if "prose alone" in rows and "code alone" in rows:
        lines += ["Goals (baselines named in each column):", ""] + goals_table(rows) + [""]
    if data.get("sae_metrics"):
        from saemerge.report import sae_table
        lines += ["Shared SAEs of the merged rows:", ""]
        for site in data["sae_metrics"]["sites"]:
            lines += ["Layers: " + ", ".join(f"{n} `{p}`" for n, p in site["layers"].items()), "", sae_table(site), ""]
    if data.get("ablation"):
        lines += ["Ablation (one switch at a time, same budget):", ""] + ablation_table(data["ablation"]) + [""]
    return save_report(json_path, lines, rows)


if __name__ == "__main__":
    write_report(Path(sys.argv[1]))
