#!/usr/bin/env python3
"""A merge across two tokenizers: SmolLM2-135M-Instruct (Llama, 49k vocabulary) x Gemma-3-270m (262k vocabulary),
merged through SAEs by recipes/smollm2-x-gemma3-270m.yaml into Gemma's tokenizer, beside each source alone and
three cross-tokenizer ensemble references. A per-token loss is not comparable across tokenizers, so every score
is bits per byte on the fixed test samples of eval/tasks/sample.py (saemerge_prose_sample, saemerge_code_sample;
windows of 512 tokens); the mixture is the mean of the two domains.

    python eval/zoo/prepare_pretrained.py                         # once: models/{smollm2-135m,gemma-3-270m}-hf
    python eval/cross_tokenizer_merge.py --skip-merge             # sources and ensembles (~17 min on 2 CPU cores)
    python eval/cross_tokenizer_merge.py --resume                 # adds the SAE merge, run as a user runs it
    python eval/cross_tokenizer_merge.py --skip-merge --resume --merged control=out/some-control-folder
    python eval/cross_tokenizer_merge.py --skip-merge --limit 3   # quick check: 3 documents per domain

Writes eval/results/cross_tokenizer_merge.{json,md,png} (with --limit N: cross_tokenizer_merge_limitN.*); rows
are saved as they finish and --resume skips them.

- Sources and merged folders are scored by lm-eval (saemerge.evaluate, `loglikelihood_rolling` -> bits_per_byte);
  a merged folder whose eval_results.json already holds both tasks at these settings (the recipe's own eval, the
  same call) is read from there rather than scored twice.
- The ensembles are computed here from each source's per-token log-probabilities on the same documents, taken
  exactly as lm-eval's HFLM.loglikelihood_rolling takes them (same tokens, prefix token and windows); each
  source's bits per byte from them must equal lm-eval's to 1e-4 (relative), or the script stops.
    document mixture     per document log2((P_A(doc) + P_B(doc)) / 2): a normalised mixture of the two models'
                         distributions over byte strings, weights fixed at 0.5 (a real model, if a slow one);
    span mixture         at the byte offsets where both tokenizations end a token, the two models' probabilities
                         of each span between consecutive such offsets mixed 0.5/0.5. The offsets depend on the
                         text itself, so this is NOT a normalised distribution over byte strings: an optimistic
                         reference, not a model;
    per-document oracle  the better source on each document: not a model, an upper bound on choosing one source
                         per document.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "eval"), str(REPO / "eval/tasks")]

import sample  # noqa: E402
from saemerge import evaluate, load_merged  # noqa: E402
from saemerge.evaluate import task_manager  # noqa: E402

RECIPE = REPO / "recipes/smollm2-x-gemma3-270m.yaml"
MERGED = REPO / "out/smollm2-x-gemma3-270m"
SOURCES = {"SmolLM2-135M-Instruct": REPO / "models/smollm2-135m-hf", "Gemma-3-270m": REPO / "models/gemma-3-270m-hf"}
TASKS = {"prose": "saemerge_prose_sample", "code": "saemerge_code_sample"}
INCLUDE = REPO / "eval/tasks"
MAX_LENGTH, BATCH_SIZE = 512, 4  # as recipes/gemma3-270m-general-x-code.yaml: Gemma's sliding window
TOLERANCE = 1e-4  # relative: our per-token bits per byte of a source vs lm-eval's

SAE = "SAE merge (recipes/smollm2-x-gemma3-270m.yaml)"
DOC_MIX = "document mixture (0.5/0.5 over whole documents)"
SPAN_MIX = "span mixture at common boundaries (not normalised: an optimistic reference, not a model)"
ORACLE = "per-document oracle (not a model, an upper bound on choosing one source per document)"


def documents(domain: str, limit: int | None) -> list[str]:
    """The task's documents, read as its YAML reads them: the test split through sample.<domain>."""
    with gzip.open(REPO / f"eval/data/{domain}/test.jsonl.gz", "rt") as f:
        texts = getattr(sample, domain)({"text": [json.loads(line)["text"] for line in f]})["text"]
    return texts[:limit]  # lm-eval's --limit keeps the first N documents


def check_documents(texts: dict[str, list[str]], limit: int | None) -> None:
    """The documents and byte counts must be lm-eval's own (its doc_to_target and count_bytes)."""
    tasks = task_manager(str(INCLUDE)).load(list(TASKS.values()))["tasks"]
    for domain, name in TASKS.items():
        task = tasks[name]
        theirs = [task.doc_to_target(doc) for doc in task.eval_docs][:limit]
        assert theirs == texts[domain], f"{name}: lm-eval's documents differ from sample.{domain}'s"
        assert sum(map(task.count_bytes, theirs)) == sum(len(t.encode("utf-8")) for t in texts[domain])


def byte_ends(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Each token's end as a UTF-8 byte offset (fast tokenizers give character offsets)."""
    chars_to_bytes = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])])
    return chars_to_bytes[[end for _, end in offsets]]


@torch.no_grad()
def token_logprobs(lm, text: str) -> dict:
    """log2 P of each token of `text` exactly as HFLM.loglikelihood_rolling scores it (its tokens, its prefix
    token, its disjoint rolling windows, its input slice), with each token's byte end."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = lm.tok_encode(text)
    encoding = lm.tokenizer(text, return_offsets_mapping=True)
    assert encoding["input_ids"] == tokens, "the offsets' tokenization differs from lm-eval's"
    windows = get_rolling_token_windows(token_list=tokens, prefix_token=lm.prefix_token_id,
                                        max_seq_len=lm.max_length, context_len=1)
    logprobs, predicted = [], []
    for context, continuation in map(make_disjoint_window, windows):
        inp = (context + continuation)[-(lm.max_length + 1):][:-1]  # as HFLM._loglikelihood_tokens
        logits = lm.model(torch.tensor([inp])).logits[0, -len(continuation):]
        scores = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(continuation)[:, None])[:, 0]
        logprobs.append(scores.double().numpy())
        predicted += continuation
    assert predicted == tokens  # the windows predict every token once, in order
    return {"bits": np.concatenate(logprobs) / math.log(2), "ends": byte_ends(text, encoding["offset_mapping"]),
            "tokens": tokens, "windows": len(logprobs)}


def span_bits(a: dict, b: dict, n_bytes: int) -> tuple[float, int]:
    """log2 of the 0.5/0.5 mixture of the two models' probabilities of each span between consecutive common token
    boundaries, summed. A token belongs to the span its byte end falls in (a BOS ends at byte 0: the first span)."""
    common = np.intersect1d(a["ends"], b["ends"])
    common = common[common > 0]
    assert common[-1] == n_bytes, "both tokenizations must end at the document's end"
    span_a = np.bincount(np.searchsorted(common, a["ends"]), weights=a["bits"], minlength=len(common))
    span_b = np.bincount(np.searchsorted(common, b["ends"]), weights=b["bits"], minlength=len(common))
    return float(np.sum(np.logaddexp2(span_a, span_b) - 1)), len(common)  # and the number of spans


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = REPO / args.out
        self.out.mkdir(parents=True, exist_ok=True)
        suffix = f"_limit{args.limit}" if args.limit else ""  # a quick check never overwrites the full results
        self.json_path = self.out / f"cross_tokenizer_merge{suffix}.json"
        resume = args.resume and self.json_path.exists()
        self.results = json.loads(self.json_path.read_text()) if resume else {"rows": {}}
        self.texts = {d: documents(d, args.limit) for d in TASKS}
        self.bytes = {d: [len(t.encode("utf-8")) for t in texts] for d, texts in self.texts.items()}
        self.logprobs = {}  # {source: {domain: [token_logprobs per document]}}, for the ensembles

    def setup(self, **entries):
        self.results.setdefault("setup", {}).update(entries)
        self.json_path.write_text(json.dumps(self.results, indent=2))

    def save(self, name, entry):
        self.results["rows"][name] = entry
        self.json_path.write_text(json.dumps(self.results, indent=2))
        print(f"{name[:60]:60s} prose {entry['prose']['bpb']:.4f}  code {entry['code']['bpb']:.4f}  "
              f"mix {entry['mix']['bpb']:.4f}  ({entry['seconds']:.0f}s)", flush=True)

    def lm_eval(self, model, tokenizer) -> dict:
        results = evaluate(model, tokenizer, list(TASKS.values()), include_path=INCLUDE, limit=self.args.limit,
                           batch_size=BATCH_SIZE, max_length=MAX_LENGTH)
        return scores({d: results[t]["bits_per_byte"] for d, t in TASKS.items()})

    # --- the sources: lm-eval, then the per-token log-probabilities the ensembles need ----------------------
    def sources(self):
        ensembles_done = all(n in self.results["rows"] for n in (DOC_MIX, SPAN_MIX, ORACLE))
        for name, folder in SOURCES.items():
            row = f"{name} alone"
            if row in self.results["rows"] and ensembles_done:
                print(f"[skip] {row}")
                continue
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder)
            if row not in self.results["rows"]:
                self.save(row, {"group": "source", "folder": str(folder.relative_to(REPO)),
                                **self.lm_eval(model, tokenizer), "seconds": round(time.perf_counter() - start, 1)})
            if not ensembles_done:
                self.per_token(name, model, tokenizer, self.results["rows"][row])
            del model

    def per_token(self, name, model, tokenizer, row):
        """Score every document token by token, then check the sum against lm-eval's bits per byte (row 1)."""
        from lm_eval.models.huggingface import HFLM

        start = time.perf_counter()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH_SIZE, max_length=MAX_LENGTH)
        self.logprobs[name] = {d: [token_logprobs(lm, t) for t in texts] for d, texts in self.texts.items()}
        seconds = round(time.perf_counter() - start, 1)
        check, special = {}, {}
        for domain, docs in self.logprobs[name].items():
            ours = -sum(doc["bits"].sum() for doc in docs) / sum(self.bytes[domain])
            theirs = row[domain]["bpb"]
            check[domain] = {"lm_eval_bpb": theirs, "our_bpb": ours, "relative_difference": abs(ours - theirs) / theirs}
            assert check[domain]["relative_difference"] <= TOLERANCE, f"{name} {domain}: {check[domain]}"
            # the special tokens lm-eval scores as part of the text (Gemma's tokenizer adds <bos>)
            special[domain] = 0.0 - sum(doc["bits"][np.isin(doc["tokens"], tokenizer.all_special_ids)].sum()
                                        for doc in docs)
        print(f"consistency {name}: " + ", ".join(f"{d} {c['our_bpb']:.5f} vs lm-eval {c['lm_eval_bpb']:.5f}"
                                                  for d, c in check.items()), flush=True)
        self.results.setdefault("consistency", {})[name] = check
        first = self.logprobs[name]["prose"][0]["tokens"]
        self.setup(**{f"tokens {name}": {
            "prefix_token": [lm.prefix_token_id, tokenizer.convert_ids_to_tokens(lm.prefix_token_id)],
            "text_starts_with": tokenizer.convert_ids_to_tokens(first[:2]),
            "tokens": {d: sum(len(doc["tokens"]) for doc in docs) for d, docs in self.logprobs[name].items()},
            "windows": {d: sum(doc["windows"] for doc in docs) for d, docs in self.logprobs[name].items()},
            "bits_on_special_tokens": special, "per_token_seconds": seconds}})

    # --- the ensembles: per document, from the two sources' log-probabilities -------------------------------
    def ensembles(self):
        if all(n in self.results["rows"] for n in (DOC_MIX, SPAN_MIX, ORACLE)):
            return
        a, b = (self.logprobs[name] for name in SOURCES)
        seconds = sum(self.results["setup"][f"tokens {name}"]["per_token_seconds"] for name in SOURCES)
        bits = {DOC_MIX: {}, SPAN_MIX: {}, ORACLE: {}}  # {row: {domain: log2 P per document}}
        boundaries, picks = {}, {}
        for domain, n_bytes in self.bytes.items():
            doc_a = np.array([doc["bits"].sum() for doc in a[domain]])
            doc_b = np.array([doc["bits"].sum() for doc in b[domain]])
            bits[DOC_MIX][domain] = np.logaddexp2(doc_a, doc_b) - 1
            bits[ORACLE][domain] = np.maximum(doc_a, doc_b)
            spans = [span_bits(x, y, n) for x, y, n in zip(a[domain], b[domain], n_bytes)]
            bits[SPAN_MIX][domain] = np.array([s for s, _ in spans])
            boundaries[domain] = sum(n for _, n in spans)
            picks[domain] = dict(zip(SOURCES, map(int, (np.sum(doc_a >= doc_b), np.sum(doc_a < doc_b)))))
        for name, per_doc in bits.items():
            bpb = {d: -float(per_doc[d].sum()) / sum(self.bytes[d]) for d in TASKS}
            self.save(name, {"group": "ensemble reference" if name != DOC_MIX else "ensemble", **scores(bpb),
                             "seconds": seconds, "per_document_bits": {d: per_doc[d].tolist() for d in TASKS}})
        self.setup(common_boundaries=boundaries, oracle_picks=picks)

    # --- the merges ------------------------------------------------------------------------------------------
    def sae_merge(self):
        """`saemerge merge` as a user runs it (timed, including whatever eval the recipe asks for), then the
        folder scored like every other row."""
        if SAE in self.results["rows"]:
            print(f"[skip] {SAE}")
            return
        merge_seconds = None
        if not self.args.skip_merge:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "saemerge", "merge", str(RECIPE.relative_to(REPO)), "--overwrite",
                            "--quiet"], cwd=REPO, check=True)
            merge_seconds = round(time.perf_counter() - start, 1)
        if not (MERGED / "config.json").is_file():
            print(f"[skip] {SAE}: no merged folder {MERGED.relative_to(REPO)} yet")
            return
        self.merged_row(SAE, MERGED, "SAE merge", merge_seconds=merge_seconds)

    def merged_row(self, name, folder, group, merge_seconds=None):
        if name in self.results["rows"]:
            print(f"[skip] {name}")
            return
        start = time.perf_counter()
        entry = {"group": group, "folder": os.path.relpath(folder, REPO)}
        saved = folder / "eval_results.json"  # the merge's own lm-eval run, if it scored these tasks as here
        saved = json.loads(saved.read_text()) if saved.is_file() else {}
        if (not self.args.limit and saved.get("config", {}).get("max_length") == MAX_LENGTH
                and saved.get("config", {}).get("limit") is None and all(t in saved["results"] for t in TASKS.values())):
            entry.update(scores({d: saved["results"][t]["bits_per_byte"] for d, t in TASKS.items()}),
                         scored_by="the merge's own eval_results.json (the same lm-eval call and settings)",
                         eval_seconds=json.loads((folder / "metrics.json").read_text())["timings"]["evaluate"])
        else:
            model, tokenizer = load_merged(folder)
            entry.update(self.lm_eval(model, tokenizer), eval_seconds=round(time.perf_counter() - start, 1))
        if merge_seconds is not None:
            entry["merge_seconds"] = merge_seconds
        entry["seconds"] = round(entry["eval_seconds"] + (merge_seconds or 0), 1)
        self.save(name, entry)

    def run(self):
        check_documents(self.texts, self.args.limit)
        self.setup(limit=self.args.limit, max_length=MAX_LENGTH, batch_size=BATCH_SIZE, tolerance=TOLERANCE,
                   torch_threads=torch.get_num_threads(),
                   sources={n: str(f.relative_to(REPO)) for n, f in SOURCES.items()},
                   documents={d: len(t) for d, t in self.texts.items()},
                   bytes={d: sum(n) for d, n in self.bytes.items()},
                   versions={p: version(p) for p in ("torch", "transformers", "tokenizers", "lm_eval", "saemerge")})
        self.sae_merge()
        for name, folder in self.args.merged:
            self.merged_row(name, folder, "merged (extra)")
        self.sources()
        self.ensembles()


def scores(bpb: dict[str, float]) -> dict:
    return {**{d: {"bpb": bpb[d]} for d in TASKS}, "mix": {"bpb": sum(bpb.values()) / len(bpb)}}


def write_report(json_path: Path) -> None:
    """The markdown table and the bar chart beside the JSON."""
    data = json.loads(json_path.read_text())
    rows, setup = data["rows"], data["setup"]
    lines = ["# SmolLM2-135M-Instruct x Gemma-3-270m: a merge across two tokenizers (test samples)", "",
             "Bits per byte from lm-evaluation-harness (`loglikelihood_rolling`, windows of "
             f"{setup['max_length']} tokens) on `saemerge_prose_sample` ({setup['documents']['prose']} documents, "
             f"{setup['bytes']['prose']} bytes) and `saemerge_code_sample` ({setup['documents']['code']} documents, "
             f"{setup['bytes']['code']} bytes)" + (f", first {setup['limit']} documents per domain" if setup["limit"]
                                                  else "") + "; the mixture is the mean of the two domains. "
             "Seconds: wall time on 2 CPU cores (a source: loading + lm-eval; a merge: `saemerge merge` + lm-eval; "
             "the ensembles: scoring both sources token by token, shared by the three).", "",
             "| model | prose bpb | code bpb | mixture bpb | seconds |", "|---|---|---|---|---|"]
    order = ["source", "SAE merge", "merged (extra)", "ensemble", "ensemble reference"]
    rows = dict(sorted(rows.items(), key=lambda item: order.index(item[1]["group"])))
    for name, r in rows.items():
        lines.append(f"| {name} | {r['prose']['bpb']:.4f} | {r['code']['bpb']:.4f} | **{r['mix']['bpb']:.4f}** | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "- **document mixture**: per document, log2((P_A(doc) + P_B(doc)) / 2), weights fixed at 0.5 "
              "(never tuned on test): an exact, normalised mixture of the two distributions over byte strings.",
              "- **span mixture at common boundaries**: between consecutive byte offsets where both tokenizations end "
              "a token, the two span probabilities mixed 0.5/0.5. NOT a normalised distribution over byte strings "
              "(the boundaries depend on the text): an optimistic reference, not a model.",
              "- **per-document oracle**: the better source on each document; not a model, an upper bound on choosing "
              "one source per document.", "",
              f"The ensembles use each source's per-token log-probabilities taken as lm-eval takes them; their sum "
              f"reproduces lm-eval's bits per byte of each source (checked to {setup['tolerance']:g} relative):", "",
              "| source | domain | lm-eval bpb | per-token bpb | relative difference |", "|---|---|---|---|---|"]
    for name, check in data.get("consistency", {}).items():
        for domain, c in check.items():
            lines.append(f"| {name} | {domain} | {c['lm_eval_bpb']:.6f} | {c['our_bpb']:.6f} | "
                         f"{c['relative_difference']:.1e} |")
    lines += ["", "| source | prefix token (lm-eval) | text starts with | prose tokens | code tokens | "
              "bits on special tokens (prose, code) |", "|---|---|---|---|---|---|"]
    for name in SOURCES:
        t = setup.get(f"tokens {name}")
        if t:  # a | inside a table cell must be escaped, even in code
            prefix, starts = (x.replace("|", "\\|") for x in (t["prefix_token"][1], " ".join(t["text_starts_with"])))
            lines.append(f"| {name} | `{prefix}` | `{starts}` "
                         f"| {t['tokens']['prose']} | {t['tokens']['code']} | "
                         f"{t['bits_on_special_tokens']['prose']:.1f}, {t['bits_on_special_tokens']['code']:.1f} |")
    gemma = setup.get("tokens Gemma-3-270m")
    if gemma:
        share = {d: gemma["bits_on_special_tokens"][d] / setup["bytes"][d] for d in TASKS}
        lines += ["", f"lm-eval scores the tokenizer's own special tokens as text: Gemma's tokenizer adds `<bos>` and "
                  f"HFLM also prefixes `{gemma['prefix_token'][1]}`, so every document starts by predicting `<bos>` "
                  f"after `<bos>`: {gemma['bits_on_special_tokens']['prose']:.0f} bits on prose, "
                  f"{gemma['bits_on_special_tokens']['code']:.0f} on code, i.e. +{share['prose']:.4f} / "
                  f"+{share['code']:.4f} bpb in every row scored with Gemma's tokenizer (Gemma alone, the merge; the "
                  f"ensembles through Gemma's term), none in SmolLM2's (it adds no BOS; its prefix is "
                  f"`{setup['tokens SmolLM2-135M-Instruct']['prefix_token'][1]}`, its BOS, not `<|endoftext|>`). "
                  "That counts the `<bos>` token alone; the second `<bos>` also changes Gemma's predictions after it, "
                  "which these rows include too."]
    if "common_boundaries" in setup:
        boundaries = ", ".join(f"{d} {n}" for d, n in setup["common_boundaries"].items())
        picks = "; ".join(f"{d}: " + ", ".join(f"{name} {k}" for name, k in p.items())
                          for d, p in setup["oracle_picks"].items())
        lines += ["", f"Common token boundaries (spans of the span mixture): {boundaries}; the oracle picks {picks} "
                  "documents."]
    json_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"source": "tab:blue", "SAE merge": "tab:red", "merged (extra)": "tab:orange",
               "ensemble": "tab:green", "ensemble reference": "tab:gray"}
    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.5))
    values = [rows[n]["mix"]["bpb"] for n in names]
    ax.barh(range(len(names)), values, color=[colours.get(rows[n]["group"], "black") for n in names])
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), [n if len(n) < 60 else n[:57] + "..." for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mixture bits per byte (mean of prose and code; lower is better)")
    ax.set_xlim(0, max(values) * 1.15)
    ax.set_title("SmolLM2-135M-Instruct x Gemma-3-270m (gray: references, not models)", fontsize=10)
    fig.tight_layout()
    fig.savefig(json_path.with_suffix(".png"), dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-merge", action="store_true", help="do not run `saemerge merge` (score its folder "
                        "if it exists)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the JSON")
    parser.add_argument("--limit", type=int, help="the first N documents per domain (a quick check)")
    parser.add_argument("--merged", action="append", default=[], metavar="NAME=FOLDER",
                        help="also score this merged folder (repeatable)")
    parser.add_argument("--out", default="eval/results")
    args = parser.parse_args()
    if not args.skip_merge and not RECIPE.is_file():
        sys.exit(f"{RECIPE.relative_to(REPO)}: no such recipe yet (the cross-tokenizer merge); run with --skip-merge")
    if any("=" not in spec for spec in args.merged):
        sys.exit("--merged: expected NAME=FOLDER")
    args.merged = [(name, Path(folder).resolve()) for name, folder in (s.split("=", 1) for s in args.merged)]
    torch.manual_seed(0)
    os.chdir(REPO)  # the task YAMLs name their data files relative to the repository root
    bench = Bench(args)
    bench.run()
    write_report(bench.json_path)


if __name__ == "__main__":
    main()
