"""`saemerge stitch`: affine stitches between the residual streams of the real zoo models (eval/zoo/prose and
eval/zoo/code, 4-block GPT-2s sharing one tokenizer), on a few rows of real text."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from saemerge import fit_stitch, stitch_scan
from saemerge.cli import main
from saemerge.stitching import stitch_rows

from conftest import CODE, REPO

PROSE_MODEL, CODE_MODEL = REPO / "eval/zoo/prose", REPO / "eval/zoo/code"


@pytest.fixture(scope="module")
def models():
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return load(PROSE_MODEL), load(CODE_MODEL)


@pytest.fixture(scope="module")
def rows():
    """12 train rows and 4 held-out rows of 128 tokens of code, disjoint."""
    return stitch_rows(CODE, AutoTokenizer.from_pretrained(CODE_MODEL), 128, train_tokens=12 * 128,
                       heldout_tokens=4 * 128)


def test_rows_are_disjoint_and_packed(rows):
    train, heldout = rows
    assert train.shape == (12, 128) and heldout.shape == (4, 128)
    seen = {tuple(r.tolist()) for r in train}
    assert not any(tuple(r.tolist()) in seen for r in heldout)


def test_self_stitch_least_squares_is_the_identity(models, rows):
    prose, _ = models
    result = fit_stitch(prose, prose, 2, 2, *rows, steps=0, controls=False, progress=False)
    w, b = result["maps"]["lstsq"].weight.detach(), result["maps"]["lstsq"].bias.detach()
    assert (w - torch.eye(256)).norm() / torch.eye(256).norm() < 0.05
    assert b.norm() < 0.05 * result["maps"]["lstsq"].weight.norm()
    assert abs(result["penalty"]["lstsq"]) < 0.01
    assert result["ce"]["a"] == pytest.approx(result["ce"]["b"])  # the same model


def test_prose_to_code_trains_and_beats_its_controls(models, rows):
    prose, code = models
    r = fit_stitch(prose, code, 0, 1, *rows, steps=12, lr=1e-3, batch_rows=4, progress=False)
    assert r["train_loss"]["last"] < r["train_loss"]["first"]  # the training loss falls (held-out CE may not)
    assert r["d_a"] == r["d_b"] == 256
    # The stitch keeps more than B's mean does, and more than the same fit from an untrained A.
    assert r["ce"]["b"] < r["ce"]["lstsq"] < r["ce"]["mean"]
    assert 0 < r["ce_recovered"]["lstsq"] < 1
    assert r["penalty"]["random_lstsq"] > r["penalty"]["lstsq"]
    assert r["penalty"]["random_trained"] > r["penalty"]["trained"]
    assert r["penalty"]["mean"] == pytest.approx(r["ce"]["mean"] - r["ce"]["b"])


def test_widths_may_differ(models, rows):
    prose, _ = models
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=8192)
    torch.manual_seed(0)
    narrow = AutoModelForCausalLM.from_config(config).eval()  # built in memory: no tokenizer folder to check
    r = fit_stitch(prose, narrow, 1, 0, *rows, steps=2, batch_rows=2, controls=False, progress=False)
    assert (r["d_a"], r["d_b"]) == (256, 64)
    assert r["maps"]["trained"].weight.shape == (64, 256)
    assert np.isfinite(r["penalty"]["trained"])


def test_scan_matrix_and_heatmap(models, rows, tmp_path):
    prose, code = models
    out = tmp_path / "scan"
    report = stitch_scan(prose, code, [0, 3], [1, 2, 3], rows, steps=0, controls=False, output=out, progress=False)
    matrix = np.array(report["penalty"]["lstsq"])
    assert matrix.shape == (2, 3) and np.isfinite(matrix).all()
    assert (matrix > 0).all()  # a different model's residual always costs something here
    saved = json.loads((out / "stitch.json").read_text())
    assert saved["penalty"]["lstsq"] == report["penalty"]["lstsq"] and "maps" not in saved["pairs"][0]
    image = np.asarray(Image.open(out / "stitch_heatmap.png").convert("L"), dtype=float)
    assert image.std() > 20 and len(np.unique(image)) > 20  # drawn cells, numbers and a colour bar, not blank
    assert "| 3 | 2 |" in (out / "stitch.md").read_text()


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "stitch"
    args = ["stitch", str(PROSE_MODEL), str(CODE_MODEL), "--data", str(CODE), "--layers-a", "1", "--layers-b",
            "1,2", "--tokens", "512", "--heldout-tokens", "256", "--steps", "2", "--batch-rows", "2", "--output",
            str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| 1 | 2 |" in printed and f"written to {out}" in printed
    assert {p.name for p in out.iterdir()} == {"stitch.json", "stitch.md", "stitch_heatmap.png"}
    saved = json.loads((out / "stitch.json").read_text())
    assert saved["layers_b"] == [1, 2] and saved["data"]["train_rows"] == 4 and saved["data"]["heldout_rows"] == 2
    assert set(saved["penalty"]) == {"lstsq", "trained", "mean", "random_lstsq", "random_trained"}
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # no silent overwrite


@pytest.mark.parametrize("argv, expected", [
    (["stitch", "OTHER_TOKENIZER", "eval/zoo/prose", "--data", "eval/data/code/validation.jsonl.gz"],
     "MODEL_B: the tokenizer of"),
    (["stitch", "eval/zoo/prose", "eval/zoo/code", "--data", "eval/data/code/validation.jsonl.gz",
      "--layers-a", "0,7"], "--layers-a: block 7 is out of range; expected block indices 0..3"),
    (["stitch", "eval/zoo/prose", "eval/zoo/code", "--data", "no/such/file.jsonl.gz"], "--data: 'no/such/file"),
    (["stitch", "eval/zoo/prose", "eval/zoo/code", "--data", "eval/data/code/validation.jsonl.gz", "--seq-len",
      "500"], "--seq-len: 500; expected 3 to 128"),
    (["stitch", "eval/zoo/prose", "eval/zoo/code", "--data", "eval/data/prose/validation.jsonl.gz"],
     "--data: 'eval/data/prose/validation.jsonl.gz' holds"),  # 17.5k tokens; the defaults need 70k
])
def test_errors_are_one_line(argv, expected, capsys, monkeypatch, zoo):
    monkeypatch.chdir(REPO)
    argv = [str(zoo["gpt2_other_tok"]) if a == "OTHER_TOKENIZER" else a for a in argv]  # a tiny GPT-2, own tokenizer
    assert main(argv + ["--quiet"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err
