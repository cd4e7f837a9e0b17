"""How well gradient x activation attribution predicts ablation between the features of two sites, on real
dictionaries (`saemerge links`, saemerge/feature_links.py), and what each costs.

    python eval/feature_links_benchmark.py               # zoo GPT-2 code model: out/dictionaries-zoo-code
    python eval/feature_links_benchmark.py --pair gemma  # Gemma-3-270m: out/dictionaries-gemma3-270m

Per case (upstream site -> downstream site, zero or resample ablation): the 64 x 64 most active features, Spearman
and Pearson over all pairs, overlap of the 30 strongest edges, seconds of each method. Tokens: the recipe's data
drawn with the seed after the training one (other documents first). Writes eval/results/feature_links_<pair>.json,
.md, .png (attribution against ablation, one panel per case) and _edges.png (the first case's strongest edges);
each case's own links folder goes to out/feature-links-<pair>/. Cases are saved as they finish; --resume skips
those done. Run from the repository root (the recipes' paths are relative to it).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from saemerge.feature_links import feature_links

REPO = Path(__file__).resolve().parent.parent
PAIRS = {
    "zoo": {"folder": "out/dictionaries-zoo-code", "tokens": 4096, "cases": [
        ("transformer.h.1", "transformer.h.2", "zero"),  # residual -> the next block's residual
        ("transformer.h.1", "transformer.h.2", "resample"),
        ("transformer.h.1.attn", "transformer.h.1", "zero"),  # what attention writes -> its block's residual
        ("transformer.h.0", "transformer.h.3", "zero"),  # three blocks apart
    ]},
    # Gemma costs ~15x more per token than the zoo GPT-2 on CPU: fewer tokens.
    "gemma": {"folder": "out/dictionaries-gemma3-270m", "tokens": 2048, "cases": [
        ("model.layers.4", "model.layers.5", "zero"),
        ("model.layers.4", "model.layers.5", "resample"),
        ("model.layers.5.post_attention_layernorm", "model.layers.5", "zero"),
    ]},
}


def markdown(results: dict) -> str:
    s = results["setup"]
    lines = [f"# Feature links: attribution against ablation ({s['pair']})", "",
             f"{s['folder']}; {s['features']} x {s['features']} most active features per case, tokens of the "
             "recipe's data (seed + 1, position 0 left out). Effect = mean over tokens of the downstream feature "
             "clean minus with the upstream one ablated (one forward per upstream feature); attribution = gradient "
             "x (activation - ablated value) (one backward per downstream feature). Top-30: share of the 30 "
             "strongest ablation edges among the 30 strongest attributions; same sign: on those 30.", "",
             "| upstream | downstream | ablation | tokens | Spearman | Pearson | top-30 overlap | same sign | "
             "ablation s | attribution s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        a, t = c["agreement"], c["seconds"]
        lines.append(f"| `{c['upstream']}` | `{c['downstream']}` | {c['ablation']} | {c['tokens']} | "
                     f"{a['spearman']:.3f} | {a['pearson']:.3f} | {a['top_k_overlap']:.0%} | "
                     f"{a['top_k_same_sign']:.0%} | {t['ablation']:.1f} | {t['attribution']:.1f} |")
    lines += ["", "Strongest edges (effect / attribution; feature [[its top token]]):", ""]
    for c in results["cases"]:
        edges = ", ".join(f"{e['upstream']} [[{e['upstream_token']}]] -> {e['downstream']} [[{e['downstream_token']}]]"
                          f" {e['effect']:+.3f} / {e['attribution']:+.3f}" for e in c["strongest"][:3])
        lines.append(f"- {c['upstream']} -> {c['downstream']} ({c['ablation']}): {edges}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path, reports: dict) -> None:
    """Attribution against ablation effect for every pair, one panel per case, with the line y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in results["cases"] if c["name"] in reports]
    fig, axes = plt.subplots(1, len(cases), figsize=(3.6 * len(cases), 3.6), squeeze=False)
    for ax, c in zip(axes[0], cases):
        edges = reports[c["name"]]["edges"]
        x, y = [e["effect"] for e in edges], [e["attribution"] for e in edges]
        ax.scatter(x, y, s=4, alpha=0.4)
        lo, hi = min(x + y), max(x + y)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(f"{c['upstream']} -> {c['downstream']}\n{c['ablation']}: Spearman "
                     f"{c['agreement']['spearman']:.2f}, Pearson {c['agreement']['pearson']:.2f}", fontsize=8)
        ax.set_xlabel("ablation effect", fontsize=8)
        ax.set_ylabel("attribution", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def top_token(report: dict, end: str, feature: int) -> str:
    snippets = report["snippets"][end].get(str(feature))
    return snippets[0]["text"].split("[[", 1)[1].rsplit("]]", 1)[0].strip() if snippets else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=PAIRS, default="zoo")
    parser.add_argument("--features", type=int, default=64, help="most active features per site (default: 64)")
    parser.add_argument("--tokens", type=int, help="tokens per case (default: 4096 zoo, 2048 gemma)")
    parser.add_argument("--resume", action="store_true", help="keep the cases already in the results file")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", default="eval/results")
    args = parser.parse_args()

    pair = PAIRS[args.pair]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"feature_links_{args.pair}.json"
    results = json.loads(json_path.read_text()) if args.resume and json_path.exists() else {"cases": []}
    results["setup"] = {"pair": args.pair, "folder": pair["folder"], "features": args.features,
                        "tokens": args.tokens or pair["tokens"], "top_edges": 30}
    links_root = REPO / "out" / f"feature-links-{args.pair}"
    reports = {}
    for upstream, downstream, ablation in pair["cases"]:
        name = f"{upstream}--{downstream}--{ablation}"
        folder = links_root / name
        if any(c["name"] == name for c in results["cases"]):
            if (folder / "links.json").is_file():
                reports[name] = json.loads((folder / "links.json").read_text())
            continue
        report = feature_links(pair["folder"], upstream, downstream, output=folder, tokens=results["setup"]["tokens"],
                               upstream_features=args.features, downstream_features=args.features,
                               ablation=ablation, top_edges=30, overwrite=True, progress=not args.quiet)
        reports[name] = report
        strongest = [{**e, "upstream_token": top_token(report, "upstream", e["upstream"]),
                      "downstream_token": top_token(report, "downstream", e["downstream"])}
                     for e in report["edges"][:10]]
        results["cases"].append({"name": name, "upstream": upstream, "downstream": downstream, "ablation": ablation,
                                 "tokens": report["settings"]["tokens"], "agreement": report["agreement"],
                                 "seconds": report["seconds"], "strongest": strongest})
        print(f"{name}: {report['agreement']} {report['seconds']}", flush=True)
        json_path.write_text(json.dumps(results, indent=2))
        (out / f"feature_links_{args.pair}.md").write_text(markdown(results))
    plot(results, out / f"feature_links_{args.pair}.png", reports)
    first = links_root / results["cases"][0]["name"] / "links.png"
    if first.is_file():
        shutil.copy(first, out / f"feature_links_{args.pair}_edges.png")
    print(markdown(results), end="")


if __name__ == "__main__":
    main()
