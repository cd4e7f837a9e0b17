"""`saemerge report`: the feature browser of a tiny real merge, rendered by a real headless Chromium."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from saemerge import analyze, build_report, load_recipe, merge
from saemerge.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = [  # the quickstart recipe, shrunk: 64 latents, 4096 training tokens, no calibration; absolute paths
    "latent.size=64", "latent.k=8", "data.seq_len=32", "data.tokens=4096", "data.shuffle_buffer=8",
    "train.batch_tokens=512", "train.eval_tokens=512", "merge.calibrate.steps=0",
    f"models.0.model={REPO / 'eval/zoo/prose'}", f"models.1.model={REPO / 'eval/zoo/code'}",
    f"data.datasets.0.data_files={REPO / 'eval/data/prose/validation.jsonl.gz'}",
    f"data.datasets.1.data_files={REPO / 'eval/data/code/validation.jsonl.gz'}",
]


def chromium(*args: str, tmp: Path) -> str:
    """Run Debian's chromium headless; the project's rule is real browsers in tests, so a missing one fails."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed; these tests need a real browser: apt-get install -y chromium")
    run = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp}", *args],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    recipe = load_recipe(REPO / "recipes/quickstart.yaml", TINY)
    folder = merge(recipe, output=root / "merged", evaluate_after=False, progress=False)
    analyze(folder, output=folder / "analysis")  # found inside the merged folder by build_report
    # What `saemerge eval` writes (its keys as in out/quickstart-linear-receiver); evaluation itself takes minutes.
    results = {"results": {"saemerge_mix": {"bits_per_byte": 2.5, "word_perplexity": 900.0}},
               "config": {"tasks": ["saemerge_mix"], "limit": 8, "max_length": 32}}
    (folder / "eval_results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture(scope="module")
def site(merged):
    return build_report(merged, tokens=2048, latents=12, progress=False)


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("href", "src") and v]


def parse(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text())
    return links


def test_index_renders_in_chromium(site, merged, tmp_path):
    assert site == merged / "browser"
    dom = chromium("--dump-dom", (site / "index.html").as_uri(), tmp=tmp_path)
    assert "prose-x-code" in dom  # the recipe's name, and the recipe itself
    assert "latent:" in dom and "size: 64" in dom
    for section in ("Sparse autoencoders", "Training", "Evaluation", "Dictionaries compared", "Latents"):
        assert f">{section}</h2>" in dom
    assert "max_cosine.png" in dom and "training_curves.png" in dom
    assert "saemerge_mix" in dom and "bits_per_byte" in dom and ">2.5<" in dom
    pages = sorted((site / "latents").glob("*.html"))
    assert len(pages) == 12
    assert all(f'href="latents/{p.name}"' in dom for p in pages)  # the latent table links every page
    assert "fire in every source" in dom  # says how latents were chosen


def test_latent_page_renders_in_chromium(site, merged, tmp_path):
    page = sorted((site / "latents").glob("*.html"))[0]
    dom = chromium("--dump-dom", page.as_uri(), tmp=tmp_path)
    assert "Decoder norm".lower() in dom.lower() and "firing rate" in dom
    assert "Jaccard" in dom and "Top-activating snippets" in dom and "Promoted tokens" in dom
    assert dom.count('class="snippet"') >= 1 and 'title="activation ' in dom
    assert "direct-logit reading" in dom
    # Promoted tokens: 10 per source, each a token with its logit.
    assert dom.count("<code>") >= 20


def test_every_local_link_resolves_and_nothing_is_external(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) == 13
    for page in pages:
        parsed = parse(page)
        assert "script" not in parsed.tags and "link" not in parsed.tags  # no scripts, no external stylesheets
        for link in parsed.links:
            url = urlparse(link)
            assert not url.scheme and not url.netloc, f"{page.name}: external {link}"
            if url.path:
                assert (page.parent / unquote(url.path)).is_file(), f"{page.name}: {link} does not resolve"


def test_screenshot_of_the_index_is_not_blank(site, tmp_path):
    png = tmp_path / "index.png"
    chromium(f"--screenshot={png}", "--window-size=1200,900", (site / "index.html").as_uri(), tmp=tmp_path)
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[:2] == (900, 1200)
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    assert colours > 100 and image.std() > 10, (colours, image.std())
    assert (image < 128).any(axis=-1).mean() > 0.005  # dark pixels: text was drawn


def test_text_is_escaped(merged, tmp_path):
    data = tmp_path / "tricky.jsonl"
    text = "if a < b and c > d: print('<script>alert(1)</script>', x & y)\n"
    data.write_text("".join(json.dumps({"text": text * 4}) + "\n" for _ in range(20)))
    site = build_report(merged, output=tmp_path / "site", tokens=256, latents=3, data=data, progress=False)
    page = sorted((site / "latents").glob("*.html"))[0]
    dom = chromium("--dump-dom", page.as_uri(), tmp=tmp_path)
    assert "<script" not in dom and "&lt;" in dom  # shown as text, never parsed as markup
    assert str(data) in (site / "index.html").read_text()


def test_bad_input_is_one_line_and_exit_2(merged, site, tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DIR:" in err[0] and "neither a merged model folder" in err[0]
    assert main(["report", str(merged), "--quiet"]) == 2  # the site of the fixture exists
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output:" in err[0] and "--overwrite" in err[0]
    assert main(["report", str(merged), "--output", str(tmp_path / "x"), "--analysis", str(tmp_path)]) == 2
    assert "--analysis:" in capsys.readouterr().err


def test_analysis_folder_alone(merged, tmp_path):
    site = build_report(merged / "analysis", output=tmp_path / "site")
    names = {p.name for p in (site / "analysis").iterdir()}
    listed = json.loads((merged / "analysis/analysis.json").read_text())["comparisons"][0]["plots"]
    assert set(listed.values()) <= names
    dom = chromium("--dump-dom", (site / "index.html").as_uri(), tmp=tmp_path)
    assert "MMCS" in dom or "mmcs" in dom


def test_running_statistics_equal_a_dense_pass(merged, monkeypatch):
    """The bounded per-batch top-k, counts and co-firing equal those of all tokens' codes at once (encoded 7 rows
    at a time here, so chunks split batches), and the second pass finds each top example's activation again."""
    import torch

    from saemerge import browser

    from saemerge.analyze import _merged_sites
    from saemerge.browser import choose_latents, harvest, snippet_codes
    from saemerge.harvest import activations
    from saemerge.pipeline import load_sources
    from saemerge.sae import SparseAutoencoder

    recipe = load_recipe(merged / "recipe.yaml")
    sources = load_sources(recipe)
    site = _merged_sites(merged)[0]
    saes = [{n: SparseAutoencoder.load(site[n]) for n in sources}]
    paths = {n: [site[n].name] for n in sources}
    ids = torch.randint(0, 8000, (10, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(browser, "CHUNK", 64 * 7)
    got_ids, (st,) = harvest(sources, paths, saes, iter(ids.split(3)), 10, top=4, progress=False)
    assert torch.equal(got_ids["prose"], ids) and st.tokens == 10 * 15
    codes = {n: saes[0][n].encode(x) for n, x in activations(sources, paths, ids)[0].items()}
    for n, z in codes.items():
        assert torch.equal(st.count[n], (z > 0).sum(0))
        assert torch.allclose(st.top_val[n], z.topk(4, dim=0).values, atol=1e-5)
    assert torch.equal(st.both["prose", "code"], ((codes["prose"] > 0) & (codes["code"] > 0)).sum(0))
    # Sources with their own token streams (tokenizers that differ): the same counts here, and no co-firing.
    _, (apart,) = harvest(sources, paths, saes, {n: iter(ids.split(3)) for n in sources}, 10, top=4, shared=False,
                          progress=False)
    assert not apart.both and all(torch.equal(apart.count[n], st.count[n]) for n in sources)
    kinds = choose_latents(st, 8)
    assert len(kinds) == 8 and len({j for j, _ in kinds}) == 8
    for j, kind in kinds:  # each says where its latent fires
        fires = {n for n in sources if st.count[n][j] > 0}
        assert fires == ({"prose", "code"} if kind == "all sources" else {kind.removesuffix(" only")}), (j, kind)
    chosen = [j for j, _ in kinds]
    snippet_codes(sources, paths, saes, got_ids, [st], [chosen], progress=False)
    for col, j in enumerate(chosen):
        for n in sources:
            value, pos = float(st.top_val[n][0, j]), int(st.top_pos[n][0, j])
            if value > 0:
                assert abs(float(st.snippets[n, pos // 16][pos % 16, col]) - value) < 1e-4
