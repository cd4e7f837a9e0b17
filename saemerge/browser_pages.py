"""The HTML of `saemerge report` (browser.py measures, this writes): self-contained pages, inline CSS, no scripts,
no external fonts; every text from a file, a model or a tokenizer goes through html.escape."""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from html import escape
from pathlib import Path

import torch

BEFORE, AFTER = 20, 6  # tokens shown around a snippet's max-activating token
CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1150px;
       padding: 0 16px; color: #1d1d1f; background: #fff; }
h1 { font-size: 24px; } h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0 16px; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f3f4f6; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 12px; }
img { max-width: 100%; border: 1px solid #eee; margin: 6px 0; }
img.plot { width: 49%; } .note { color: #555; } nav a { margin-right: 14px; }
pre.recipe { column-count: 3; column-rule: 1px solid #e5e7eb; font-size: 11px; }
.snippet { font: 12px/1.9 ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap;
           border-bottom: 1px solid #eee; padding: 2px 0 2px 76px; text-indent: -76px; }
.snippet span { border-radius: 2px; } .snippet .max { outline: 2px solid #b45309; }
.value { display: inline-block; width: 70px; color: #555; text-indent: 0; }
.cols { display: flex; gap: 24px; flex-wrap: wrap; } .cols > div { flex: 1; min-width: 320px; }
"""


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def table(header: list[str], rows: list[list], numeric_from: int = 1) -> str:
    """An HTML table; cells are escaped unless given as ("html", markup)."""
    def cell(i, v):
        if isinstance(v, tuple) and v[0] == "html":
            text = v[1]
        else:
            text = escape(f"{v:.4g}" if isinstance(v, float) else str(v))
        return f'<td class="n">{text}</td>' if i >= numeric_from else f"<td>{text}</td>"
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _flat(d, prefix: str = "") -> list[tuple[str, object]]:
    """The scalar leaves of nested dicts as (dotted key, value): whatever keys an analysis.json holds."""
    out = []
    for k, v in (d.items() if isinstance(d, dict) else []):
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flat(v, key + ".")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((key, v))
    return out


# --- index sections -----------------------------------------------------------------------------------------
def _sae_metrics(metrics: dict | None) -> str:
    if not isinstance(metrics, dict) or not isinstance(metrics.get("sites"), list):
        return '<p class="note">No metrics.json.</p>'
    html = []
    for site in metrics["sites"]:
        layers = ", ".join(f"{s} {p}" for s, p in site.get("layers", {}).items())
        rows = [[s, m.get("explained_variance", ""), m.get("l0", ""), m.get("dead_fraction", "")]
                for s, m in site.get("sources", {}).items()]
        pairs = [[p, m.get("cross_explained_variance", ""), m.get("code_cosine", ""), m.get("active_jaccard", "")]
                 for p, m in site.get("pairs", {}).items()]
        html += [f"<h3>Site: {escape(layers)}; measured on {site.get('tokens', '?')} held-back tokens</h3>",
                 table(["source", "explained variance", "L0", "dead fraction"], rows),
                 table(["pair", "cross explained variance", "code cosine", "active-set Jaccard"], pairs)]
    return "\n".join(html)


def _evaluation(folder: Path) -> str:
    data = _json(folder / "eval_results.json")
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        return '<p class="note">No eval_results.json: the merge ran without evaluation (or it failed).</p>'
    rows = [[task, metric, value] for task, metrics in data["results"].items() if isinstance(metrics, dict)
            for metric, value in metrics.items()]
    config = data.get("config", {}) if isinstance(data.get("config"), dict) else {}
    return (table(["task", "metric", "merged model"], rows, numeric_from=2) +
            f'<p class="note">lm-evaluation-harness, limit {escape(str(config.get("limit")))}, max length '
            f'{escape(str(config.get("max_length")))}. A merge evaluates the merged model only: no baseline rows '
            "(run <code>saemerge eval</code> on a source folder for those).</p>")


def _analysis(report: dict | None, site: Path) -> str:
    """Each comparison's numbers (every scalar analysis.json holds) and the plots it lists, copied."""
    if report is None:
        return ('<p class="note">No analysis folder: run <code>saemerge analyze DIR --output DIR/analysis</code> '
                "(or pass --analysis) to add the dictionary comparison here.</p>")
    source = report["folder"]
    html = [f'<p class="note">From <code>{escape(str(source))}</code>.</p>']
    comparisons = report.get("comparisons") if isinstance(report.get("comparisons"), list) else []
    for r in comparisons:
        if not isinstance(r, dict):
            continue
        a = r.get("a", {}).get("name", "A") if isinstance(r.get("a"), dict) else "A"
        b = r.get("b", {}).get("name", "B") if isinstance(r.get("b"), dict) else "B"
        where = f" at {r['site']}" if r.get("site") else ""
        html.append(f"<h3>{escape(str(a))} vs {escape(str(b))}{escape(where)}</h3>")
        notes = r.get("notes") if isinstance(r.get("notes"), list) else []
        html += [f'<p class="note">{escape(str(n))}</p>' for n in notes]
        groups: dict[str, list[str]] = {}  # one row per top-level key: "field value · field value"
        for key, value in _flat(r):
            head, _, rest = key.partition(".")
            if head != "plots":
                shown = f"{value:.4g}" if isinstance(value, float) else str(value)
                groups.setdefault(head, []).append(f"{rest} {shown}".strip())
        html.append(table(["measure", "values"], [[k, " \u00b7 ".join(v)] for k, v in groups.items()],
                          numeric_from=9))
        plots = r.get("plots", {})
        files = list(plots.values()) if isinstance(plots, dict) else plots if isinstance(plots, list) else []
        for name in files:
            name = Path(str(name)).name  # a file of the analysis folder, nothing outside it
            if (source / name).is_file():
                (site / "analysis").mkdir(exist_ok=True)
                shutil.copy(source / name, site / "analysis" / name)
                html.append(f'<img class="plot" src="analysis/{escape(name)}" alt="{escape(name)}">')
            else:
                html.append(f'<p class="note">plot {escape(name)} is listed but missing.</p>')
    top = [(k, v) for k, v in report.items() if k not in ("comparisons", "folder") and not isinstance(v, (dict, list))]
    if top:
        html.append(table(["", "value"], [[k, v] for k, v in top]))
    md = source / "analysis.md"
    if md.is_file():
        html.append(f"<details><summary>analysis.md</summary><pre>{escape(md.read_text())}</pre></details>")
    return "\n".join(html)


# --- latents ------------------------------------------------------------------------------------------------
# What `saemerge links | circuit | features` write; a subfolder of the browsed folder holding one is shown.
FEATURE_ANALYSES = ("links", "circuit", "evolution", "clusters", "split", "subset")


def _feature_analyses(folder: Path, site: Path) -> str:
    """The summaries and figures of the feature analyses in subfolders of `folder`, the PNGs copied."""
    html = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for name in FEATURE_ANALYSES:
            if not (sub / f"{name}.md").is_file():
                continue
            html.append(f"<h3>{escape(sub.name)}</h3>")
            if (sub / f"{name}.png").is_file():
                (site / "analyses" / sub.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(sub / f"{name}.png", site / "analyses" / sub.name / f"{name}.png")
                html.append(f'<img class="plot" src="analyses/{escape(sub.name)}/{name}.png" alt="{name}">')
            html.append(f"<details open><summary>{name}.md</summary>"
                        f"<pre>{escape((sub / f'{name}.md').read_text())}</pre></details>")
    if not html:
        return ('<p class="note">None here: `saemerge links`, `circuit` and `features evolution | clusters` write '
                "into subfolders of a train-saes folder, which this page then shows.</p>")
    return "\n".join(html)


def _tokens(tokenizer):
    @lru_cache(maxsize=None)
    def text(token_id: int) -> str:  # one token alone, whitespace made visible
        return tokenizer.decode([token_id]).replace("\n", "\u21b5").replace("\t", "\u21e5")
    return text


def _page_name(site: int, latent: int, sites: int) -> str:
    return f"{latent}.html" if sites == 1 else f"site{site}-{latent}.html"


def _snippets(st, name: str, col: int, j: int, ids: torch.Tensor, text) -> str:
    seq_len = ids.shape[1]
    values, where = st.top_val[name][:, j], st.top_pos[name][:, j]
    peak = float(values.max())
    if peak <= 0:
        return f'<p class="note">Does not fire in {escape(name)} on these tokens.</p>'
    lines = []
    for value, pos in zip(values.tolist(), where.tolist()):
        if value <= 0:
            continue
        seq, at = divmod(pos, seq_len)
        acts = st.snippets[name, seq][:, col]
        spans = []
        for p in range(max(0, at - BEFORE), min(seq_len, at + AFTER + 1)):
            a = float(acts[p])
            alpha = max(0.0, min(1.0, a / peak))
            cls = ' class="max"' if p == at else ""
            spans.append(f'<span{cls} style="background: rgba(234, 88, 12, {alpha:.2f})" '
                         f'title="activation {a:.3f}">{escape(text(int(ids[seq, p])))}</span>')
        lines.append(f'<div class="snippet"><span class="value">{value:.3f}</span>{"".join(spans)}</div>')
    return "\n".join(lines)


def _latent_page(m: dict, s: int, col: int, j: int, kind: str, neighbours: tuple[str | None, str | None]) -> str:
    st, site, names = m["stats"][s], m["saes"][s], m["names"]
    where = ", ".join(f"{n} {m['paths'][n][s]}" for n in names)
    nav = ['<a href="../index.html">index</a>', '<a href="../index.html#latents">all latents</a>']
    nav += [f'<a href="{escape(p)}">{label}</a>' for p, label in zip(neighbours, ("previous", "next")) if p]
    rows = []
    for n in names:
        sae, count = site[n], int(st.count[n][j])
        norm = float(sae.W_dec[j].detach().float().norm())
        rows.append([n, norm, norm * float(sae.act_scale), count, count / max(st.tokens, 1),
                     max(0.0, float(st.top_val[n][0, j]))])
    body = [f"<nav>{' '.join(nav)}</nav>", f"<h1>Latent {j}</h1>",
            f'<p class="note">Site: {escape(where)}. Chosen as: {escape(kind)}. Measured on {st.tokens:,} token '
            "positions per source.</p>",
            "<h2>Per source</h2>",
            table(["source", "decoder norm (SAE units)", "decoder norm (activation units, x act_scale)",
                   "tokens firing", "firing rate", "max activation"], rows)]
    body.append("<h2>Co-firing</h2>")
    if st.both:
        pair_rows = []
        for (a, b), both in st.both.items():
            n_a, n_b, n_ab = int(st.count[a][j]), int(st.count[b][j]), int(both[j])
            union = n_a + n_b - n_ab
            pair_rows.append([f"{a} & {b}", n_ab, n_ab / union if union else 0.0,
                              n_ab / n_a if n_a else 0.0, n_ab / n_b if n_b else 0.0])
        body += [table(["pair", "tokens firing in both", "Jaccard (both / either)", "P(second | first)",
                        "P(first | second)"], pair_rows),
                 '<p class="note">On the same tokens: the sources read one token stream.</p>']
    else:
        body.append('<p class="note">Skipped: the sources\' tokenizers differ, so they do not read the same tokens '
                    "and there is no token where both could fire.</p>")
    body.append('<h2>Top-activating snippets</h2><p class="note">The token with the highest activation is outlined; '
                "shading is the activation relative to this latent's maximum in the source (hover a token for its "
                "value); the number on the left is the outlined token's activation.</p>")
    for n in names:
        text = _tokens(m["tokenizers"][n])
        body.append(f"<h3>{escape(n)}</h3>{_snippets(st, n, col, j, m['ids'][n], text)}")
    body.append('<h2>Promoted tokens</h2><p class="note">The decoder row in activation units (times act_scale) '
                "through the source's unembedding, W_U @ d: a direct-logit reading that skips the final norm and "
                "every later layer, so it says what the direction points at in the output space, not what the "
                "model does with it.</p>")
    columns = []
    for n in names:
        promoted = m["promoted"][s][n]
        if promoted is None:
            inner = '<p class="note">Skipped: the site\'s width differs from the head\'s (not a block output).</p>'
        else:
            text = _tokens(m["tokenizers"][n])
            values, tokens = promoted[0][col].tolist(), promoted[1][col].tolist()
            inner = table(["token", "logit"], [[("html", f"<code>{escape(repr(text(t)))}</code>"), v]
                                                for t, v in zip(tokens, values)])
        columns.append(f"<div><h3>{escape(n)}</h3>{inner}</div>")
    body.append(f'<div class="cols">{"".join(columns)}</div>')
    return page(f"latent {j}", "\n".join(body))


def _latent_table(m: dict, s: int) -> str:
    st, names = m["stats"][s], m["names"]
    header = ["latent", "chosen as"] + [f"{n} firing rate" for n in names]
    header += [f"Jaccard {a} & {b}" for a, b in st.both] + [f"{n} top token" for n in names]
    rows = []
    for j, kind in m["chosen"][s]:
        link = ("html", f'<a href="latents/{_page_name(s, j, len(m["stats"]))}">{j}</a>')
        row = [link, kind] + [int(st.count[n][j]) / max(st.tokens, 1) for n in names]
        for (a, b), both in st.both.items():
            union = int(st.count[a][j] + st.count[b][j] - both[j])
            row.append(int(both[j]) / union if union else 0.0)
        for n in names:
            fires = st.top_val[n][0, j] > 0  # the token of its highest activation
            token = _tokens(m["tokenizers"][n])(int(m["ids"][n].flatten()[st.top_pos[n][0, j]])) if fires else ""
            row.append(("html", f"<code>{escape(repr(token))}</code>" if token else ""))
        rows.append(row)
    return table(header, rows, numeric_from=2)


def _latents_section(m: dict) -> str:
    n_sources = len(m["names"])
    data = f"<code>{escape(m['data'])}</code>" if m["data"] else "the recipe's data mixture (its training stream)"
    html = [f'<p>Measured on {m["stats"][0].tokens:,} token positions per source from {data} (position 0 of '
            "each sequence left out, as in training). Latents shown: "
            + ("about three quarters are the latents that fire in every source, most frequent first (ranked by "
               "their rarest source); the rest are, per source, the most frequent latents that fire in that "
               "source alone; if too few, the most frequent others fill up."
               if n_sources > 1 else "the most frequently firing latents.") + "</p>"]
    for s in range(len(m["stats"])):
        if len(m["stats"]) > 1:
            html.append(f"<h3>Site {s}: " + escape(", ".join(f"{n} {m['paths'][n][s]}" for n in m["names"]))
                        + "</h3>")
        counts = torch.stack([m["stats"][s].count[n] for n in m["names"]]) > 0
        alone = [f"{int((counts[i] & (counts.sum(0) == 1)).sum())} in {escape(n)} alone"
                 for i, n in enumerate(m["names"])] if n_sources > 1 else []
        html.append(f"<p>Of {counts.shape[1]} latents, on these tokens: {int(counts.all(0).sum())} fire in every "
                    f"source, {', '.join(alone + [''])}{int((~counts.any(0)).sum())} in none.</p>")
        html.append(_latent_table(m, s))
    return "\n".join(html)


# --- the site -----------------------------------------------------------------------------------------------
def write_site(site: Path, folder: Path, m: dict | None, report: dict | None) -> None:
    """index.html (and latents/*.html, the copied PNGs) into `site`."""
    if m is None:  # an analysis folder alone
        body = [f"<h1>SAE dictionaries compared: {escape(folder.name)}</h1>", _analysis(report, site)]
        (site / "index.html").write_text(page(f"analysis {folder.name}", "\n".join(body)), encoding="utf-8")
        return
    recipe = m["recipe"]
    sources = ", ".join(f"{s.name} ({s.model}, layer {s.layer})" for s in recipe.models)
    sections = [("recipe", "Recipe"), ("saes", "Sparse autoencoders"), ("training", "Training"),
                ("evaluation", "Evaluation"), ("analysis", "Dictionaries compared"),
                ("features", "Feature analyses"), ("latents", "Latents")]
    body = [f"<h1>{escape(recipe.name)}</h1>",
            f'<p>Feature browser of <code>{escape(str(folder))}</code>. Sources: {escape(sources)}; '
            f"{recipe.latent.size} {escape(recipe.latent.activation)} latents. Sources loaded, run and "
            f"encoded for this site in {m['seconds']} s.</p>",
            "<nav>" + "".join(f'<a href="#{k}">{v}</a>' for k, v in sections) + "</nav>"]
    recipe_text = (folder / "recipe.yaml").read_text()
    body += ['<h2 id="recipe">Recipe</h2>', f'<pre class="recipe">{escape(recipe_text)}</pre>',
             '<h2 id="saes">Sparse autoencoders</h2>', _sae_metrics(_json(folder / "metrics.json")),
             '<h2 id="training">Training</h2>']
    if (folder / "training_curves.png").is_file():
        shutil.copy(folder / "training_curves.png", site / "training_curves.png")
        body.append('<img src="training_curves.png" alt="training curves">')
    else:
        body.append('<p class="note">No training_curves.png.</p>')
    body += ['<h2 id="evaluation">Evaluation</h2>', _evaluation(folder),
             '<h2 id="analysis">Dictionaries compared</h2>', _analysis(report, site),
             '<h2 id="features">Feature analyses</h2>', _feature_analyses(folder, site),
             '<h2 id="latents">Latents</h2>', _latents_section(m)]
    (site / "latents").mkdir()
    n_sites = len(m["stats"])
    for s, chosen in enumerate(m["chosen"]):
        names = [_page_name(s, j, n_sites) for j, _ in chosen]
        for col, (j, kind) in enumerate(chosen):
            neighbours = (names[col - 1] if col > 0 else None, names[col + 1] if col + 1 < len(names) else None)
            (site / "latents" / names[col]).write_text(_latent_page(m, s, col, j, kind, neighbours), encoding="utf-8")
    (site / "index.html").write_text(page(recipe.name, "\n".join(body)), encoding="utf-8")
