#!/usr/bin/env python3
"""The feature analyses of `saemerge features` on real dictionaries (issue 18, part 4): evolution across residual
sites, clusters, splitting across sizes, and dictionaries of a data subset against the full data.

    # zoo code model (GPT-2, 4 blocks, width 256), 8 sites; the extra dictionaries, each a few minutes:
    saemerge train-saes recipes/dictionaries-zoo-code.yaml                                         # D: 2048, seed 0
    saemerge train-saes recipes/dictionaries-zoo-code.yaml --set latent.size=512 --output out/dictionaries-zoo-code-512
    saemerge train-saes recipes/dictionaries-zoo-code.yaml --set latent.size=1024 --output out/dictionaries-zoo-code-1024
    saemerge train-saes recipes/dictionaries-zoo-code.yaml --set latent.size=512 --set train.seed=2 \\
        --output out/dictionaries-zoo-code-512-seed2
    saemerge train-saes recipes/dictionaries-zoo-code.yaml --set latent.size=1024 --set train.seed=3 \\
        --output out/dictionaries-zoo-code-1024-seed3
    saemerge train-saes recipes/dictionaries-zoo-code.yaml --set train.seed=1 --output out/dictionaries-zoo-code-seed1
    saemerge train-saes recipes/dictionaries-zoo-code.yaml --set data.tokens=500000 \\
        --set 'data.datasets=[{path: json, data_files: eval/data/code/train.jsonl.gz}]' \\
        --output out/dictionaries-zoo-code-codeonly        # D' = the code half of D (same seed: the same code stream)
    saemerge train-saes recipes/dictionaries-zoo-code.yaml --set data.tokens=250000 \\
        --output out/dictionaries-zoo-code-quarter         # D' = the first quarter of D's token stream (and its start)
    saemerge train-saes recipes/dictionaries-zoo-code.yaml --set data.tokens=250000 --set train.seed=4 \\
        --output out/dictionaries-zoo-code-quarter-seed4   # D' = a quarter of the tokens, its own start
    # Gemma-3-270m, 7 sites (each ~5 min):
    saemerge train-saes recipes/dictionaries-gemma3-270m.yaml
    saemerge train-saes recipes/dictionaries-gemma3-270m.yaml --set train.seed=1 --output out/dictionaries-gemma3-270m-seed1
    python eval/feature_analyses.py                        # eval/results/features_{zoo,gemma}.{json,md,png}

Every sample is held-out text: the validation split of the prose and code corpora, half each (the recipes train
on the train split). Folders that are missing are skipped and named in the results. Folders of one train.seed share
their start (latent j of every site begins as the same token; the first batches are the same tokens when the data
stream is), which inflates matches between them: the -seed1 folders are the controls.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from saemerge import feature_clusters, feature_evolution, feature_splitting, feature_subsets
from saemerge.dictionaries import load_dictionaries
from saemerge.recipe import DatasetSpec

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "eval/results"
ZOO = "out/dictionaries-zoo-code"
GEMMA = "out/dictionaries-gemma3-270m"


def held_out(dicts):
    """The folder's data settings with the validation split of prose and code, half each."""
    datasets = [DatasetSpec(path="json", data_files=f"eval/data/{d}/validation.jsonl.gz", weight=0.5)
                for d in ("prose", "code")]
    return dicts.recipe.data.model_copy(update={"datasets": datasets})


def demote(markdown: str) -> str:
    """Every heading one level down, to sit under the results' title."""
    return re.sub(r"^#", "##", markdown, flags=re.M)


def exists(*folders: str) -> bool:
    return all((REPO / f / "metrics.json").is_file() for f in folders)


def run(name: str, folder: str, clusters_site: str, tokens: int, extra: bool) -> None:
    start = time.perf_counter()
    dicts = load_dictionaries(folder)
    data = held_out(dicts)
    results, text, skipped = {"folder": folder, "tokens": tokens, "data": "validation split, prose + code"}, [], []
    control = f"{folder}-seed1" if exists(f"{folder}-seed1") else None  # the same recipe, train.seed 1
    if control is None:
        skipped.append(f"control: {folder}-seed1")
    print(f"{name}: evolution")
    results["evolution"] = feature_evolution.feature_evolution(
        dicts, control=control and load_dictionaries(control), tokens=tokens, data=data)
    feature_evolution.plot(results["evolution"], OUT / f"features_{name}_evolution.png")
    text.append(feature_evolution.summary(results["evolution"]))
    print(f"{name}: clusters at {clusters_site}")
    clusters = feature_clusters.feature_clusters(dicts, clusters_site, tokens=tokens, data=data, top=6, members=3)
    feature_clusters.plot(clusters, OUT / f"features_{name}_clusters.png")
    text.append(feature_clusters.summary(clusters))
    results["clusters"] = {k: v for k, v in clusters.items() if k != "labels"}  # labels: 2 x 1000s of entries
    if extra:
        splits = {"same_seed": [f"{folder}-512", f"{folder}-1024", folder],
                  "independent_seeds": [f"{folder}-512-seed2", f"{folder}-1024-seed3", folder]}
        for kind, folders in splits.items():
            if not exists(*folders):
                skipped.append(f"split {kind}: {folders}")
                continue
            print(f"{name}: split {kind}")
            split = feature_splitting.feature_splitting(folders, tokens=tokens, data=data)
            results[f"split_{kind}"] = split
            feature_splitting.plot(split, OUT / f"features_{name}_split_{kind}.png")
            text.append(f"# Splitting, {kind.replace('_', ' ')}: {', '.join(folders)}\n\n"
                        + demote(feature_splitting.summary(split)))
        for kind in ("codeonly", "quarter", "quarter-seed4"):
            if not exists(f"{folder}-{kind}"):
                skipped.append(f"subset {kind}: {folder}-{kind}")
                continue
            print(f"{name}: subset {kind}")
            subset = feature_subsets.feature_subsets(f"{folder}-{kind}", folder, control,
                                                     tokens=tokens, data=data)
            results[f"subset_{kind}"] = subset
            feature_subsets.plot(subset, OUT / f"features_{name}_subset_{kind}.png")
            text.append(f"# Subset D' = {kind}\n\n" + demote(feature_subsets.summary(subset)))
    results["skipped"] = skipped
    results["seconds"] = round(time.perf_counter() - start)
    (OUT / f"features_{name}.json").write_text(json.dumps(results, indent=2, default=str))
    head = [f"# Feature analyses: `{folder}`", "",
            f"`python eval/feature_analyses.py`, {tokens} tokens of held-out text (validation split, prose + code) per "
            f"sample, {results['seconds']}s. Figures: features_{name}_*.png."]
    head += [f"Skipped (folder missing): {', '.join(skipped)}." if skipped else "", ""]
    body = "\n".join(head + [demote(t) for t in text])
    (OUT / f"features_{name}.md").write_text(body)
    print(body)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["zoo", "gemma"], help="one model only")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per sample (default: 16384)")
    args = parser.parse_args()
    os.chdir(REPO)  # the recipes name their models and data relative to the repository
    if args.only in (None, "zoo"):
        run("zoo", ZOO, "transformer.h.2", args.tokens, extra=True)
    if args.only in (None, "gemma") and exists(GEMMA):
        run("gemma", GEMMA, "model.layers.5", args.tokens, extra=False)


if __name__ == "__main__":
    main()
