"""Random recipes at `saemerge validate` and `saemerge merge`: exit code 0 or 2 (anything uncaught fails the test),
never a traceback, never a partial output folder, nothing non-hidden written beside it.

Two kinds of input: random documents (hypothesis-built YAML, random text, random bytes) and random mutations of
a valid tiny recipe (a path set to a value of any type, a key deleted, an unknown key added). derandomize=True:
the same examples on every run.
"""

import copy
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st
from transformers import AutoModelForCausalLM

import saemerge  # noqa: F401  registers the merged architecture
from saemerge.cli import main
from saemerge.recipe import parse_recipe
from conftest import recipe_dict

# SAEMERGE_FUZZ=20 runs 20 times the examples, with fresh random ones: a longer hunt than CI's.
SCALE = int(os.environ.get("SAEMERGE_FUZZ", 1))
SETTINGS = dict(deadline=None, derandomize=SCALE == 1, suppress_health_check=list(HealthCheck), print_blob=True)
IDS = torch.randint(1, 300, (2, 8), generator=torch.Generator().manual_seed(0))

TRICKY = ["", ".", "..", "../x", "/", "~", "a/../../b", "ünïcødé ファイル 🙂", "\u202eRTL", "a\x00b", "\ud800", "\t",
          "x" * 300, "null", "1e999", "nan", "-1", "0x10", "[1, 2]", "{a: 1}", "transformer.h.1", "topk", "gpt2"]
INTS = [0, -1, 1, 2, 3, 7, 128, 129, -2**63, 2**31, 2**63, 2**64, 10**30]
FLOATS = [math.nan, math.inf, -math.inf, 1e308, -0.0, 0.0, 5e-324, 0.5, 1.5, -1e-9, 1e-30]
ints = st.integers() | st.sampled_from(INTS)
floats = st.floats() | st.sampled_from(FLOATS)
texts = st.text(max_size=12) | st.sampled_from(TRICKY)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                            max_size=3), max_leaves=6)
# Whole documents: any YAML-representable tree (keys of several types too).
keys = st.one_of(st.text(max_size=8), st.integers(), st.none(), st.booleans(), st.sampled_from(
    ["name", "models", "latent", "data", "train", "merge", "output", "size", "layer"]))
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                         max_leaves=12)

# What sets a merge's cost, capped after mutating: a mutation may make them huge (validate still sees that), but
# one merge example must stay around a second. Values of other types are left for the schema to refuse.
CAPS = {("data", "tokens"): 1024, ("train", "batch_tokens"): 512, ("train", "eval_tokens"): 512,
        ("latent", "size"): 128, ("merge", "calibrate", "steps"): 3, ("merge", "calibrate", "batch_tokens"): 256,
        ("data", "shuffle_buffer"): 64}


@pytest.fixture(scope="module", autouse=True)
def offline():
    """A random model or dataset name must not wait for the network (the hub's retries take about a minute)."""
    import datasets.config
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def base(zoo):
    """A valid tiny recipe writing to `out` in the current folder, every field spelled out (defaults too)."""
    raw = recipe_dict(zoo["gpt2"], zoo["llama"], "out", data__tokens=1024, train__eval_tokens=512)
    return parse_recipe(raw).model_dump(mode="json")


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")

    def make() -> Path:
        """A fresh folder three levels down (so '../x' stays inside the test's folder) to run in."""
        folder = Path(tempfile.mkdtemp(dir=root)) / "a" / "b" / "c"
        folder.mkdir(parents=True)
        return folder
    return make


def nodes(tree):
    """(container, key) of every value in a nested dict/list."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for key, value in items:
        yield tree, key
        yield from nodes(value)


def like(value):
    """Values of the type `value` has (the ones that get past the schema's type checks), or of any type."""
    same = {bool: st.booleans(), int: ints, float: floats | ints, str: texts}.get(type(value))
    return values if same is None else st.one_of(same, same, same, values)


@st.composite
def mutated(draw, base):
    raw = copy.deepcopy(base)
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):  # mostly one change: it gets past the schema more often
        every = list(nodes(raw))
        leaves = [n for n in every if not isinstance(n[0][n[1]], (dict, list))]
        # Mostly a leaf: replacing a whole section is refused by the schema at once.
        container, key = draw(st.sampled_from(leaves if leaves and draw(st.integers(0, 3)) else every))
        op = draw(st.sampled_from(["set"] * 4 + ["delete", "add"]))
        if op == "set":
            container[key] = draw(like(container[key]))
        elif op == "delete":
            del container[key]
        else:  # an unknown key in a mapping (or a known one set again)
            target = container[key] if isinstance(container[key], dict) else container
            if isinstance(target, dict):
                target[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return raw


def cap_budgets(raw):
    for path, cap in CAPS.items():
        node = raw
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and type(node.get(path[-1])) is int and node[path[-1]] > cap:
            node[path[-1]] = cap
    return raw


def snapshot(folder: Path) -> dict:
    """Every path under the sandbox's root (three levels up: '../x' and '../../x' land inside) with its size."""
    root = folder.parents[2]
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else -1 for p in root.rglob("*")}


def write_document(folder: Path, document) -> Path:
    path = folder / "recipe.yaml"
    if isinstance(document, bytes):
        path.write_bytes(document)
    elif isinstance(document, str):
        path.write_text(document, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_text(yaml.safe_dump(document), encoding="utf-8", errors="surrogatepass")
    return path


def run(folder: Path, capsys, *argv) -> int:
    """`saemerge *argv` in `folder`, in this process: exit code 0 or 2, and on 2 only one-line errors."""
    cwd = os.getcwd()
    capsys.readouterr()  # what came before
    os.chdir(folder)
    try:
        code = main(list(map(str, argv)))
    finally:
        os.chdir(cwd)
    assert code in (0, 2), code
    err = capsys.readouterr().err.splitlines()
    assert code == 0 or (err and all(line.startswith("error: ") for line in err)), err
    return code


def contain(raw, folder: Path):
    """Keep a merge's writes inside the sandbox: an output path leaving it becomes 'out'."""
    out = raw.get("output") if isinstance(raw, dict) else None
    try:
        leaves = isinstance(out, str) and not (folder / out).resolve().is_relative_to(folder.parents[2])
    except (ValueError, OSError):  # e.g. a NUL byte: no such path can be created anywhere
        leaves = False
    if leaves:
        raw["output"] = "out"
    return raw


def check_merge(folder: Path, capsys, recipe: Path, before: dict, raw) -> int:
    """Run `merge --no-eval --quiet`; then the sandbox holds what it held before plus, after exit code 0, one
    complete output folder that loads to finite logits, and nothing else but hidden leftovers."""
    code = run(folder, capsys, "merge", recipe, "--no-eval", "--quiet")
    root = folder.parents[2]
    new = [p for p in snapshot(folder) if p not in before and not any(part.startswith(".") for part in Path(p).parts)]
    if code == 2:
        assert not new, f"exit code 2 but written: {new}"
        return code
    output = str((folder / raw["output"]).resolve().relative_to(root))
    assert all(p == output or p.startswith(output + "/") for p in new), f"written beside {output}: {new}"
    names = {p.name for p in (root / output).iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "metrics.json", "report.md", "README.md", "saes"} <= names
    with torch.no_grad():
        assert torch.isfinite(AutoModelForCausalLM.from_pretrained(root / output)(IDS).logits).all()
    return code


@settings(max_examples=40 * SCALE, **SETTINGS)
@given(document=documents | st.text(max_size=200) | st.binary(max_size=200))
def test_random_documents(sandboxes, capsys, document):
    folder = sandboxes()
    recipe = write_document(folder, document)
    before = snapshot(folder)
    assert run(folder, capsys, "validate", recipe) == 2  # nothing random is a recipe
    assert check_merge(folder, capsys, recipe, before, None) == 2


def test_mutated_recipes_validate(sandboxes, capsys, base):
    codes = []

    @settings(max_examples=40 * SCALE, **SETTINGS)
    @given(data=st.data())
    def one(data):
        folder = sandboxes()
        recipe = write_document(folder, data.draw(mutated(base)))
        before = snapshot(folder)
        codes.append(run(folder, capsys, "validate", recipe))
        assert snapshot(folder) == before  # validate writes nothing

    one()
    assert {0, 2} <= set(codes), codes  # both outcomes were checked, not only refusals


def test_mutated_recipes_merge(sandboxes, capsys, base):
    codes = []

    @settings(max_examples=30 * SCALE, **SETTINGS)
    @given(data=st.data())
    def one(data):
        folder = sandboxes()
        raw = contain(cap_budgets(data.draw(mutated(base))), folder)
        recipe = write_document(folder, raw)
        codes.append(check_merge(folder, capsys, recipe, snapshot(folder), raw))

    one()
    assert {0, 2} <= set(codes), codes  # some mutated recipes merged, and their output folders were checked


# What the fuzzing found, kept as fixed cases: each was a traceback, or exit code 0 with a broken model.
FOUND = [
    ("train.seed", -1), ("train.seed", 2**32),           # datasets' shuffle: ValueError
    ("train.device", ""), ("train.device", "cuda:1"),    # torch.device: RuntimeError (or an assert, without CUDA)
    ("merge.scale", math.nan), ("merge.scale", 1e308),   # saved, with non-finite logits
    ("data.datasets.0.weight", math.inf),                # random.choices: ValueError
    ("data.seq_len", 129),                               # past the sources' 128 positions: IndexError
    ("name", "\ud800"),                                  # report.md: UnicodeEncodeError
    ("output", "x" * 300),                               # the hidden temporary name: OSError, name too long
    ("latent.a\x1eb", 1),                                # an error message broken over two lines
]


@pytest.mark.parametrize("path, value", FOUND, ids=[p for p, _ in FOUND])
def test_found_by_fuzzing(sandboxes, capsys, base, path, value):
    raw = copy.deepcopy(base)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = raw
    for part in parents:
        node = node[part]
    node[last] = value
    folder = sandboxes()
    recipe = write_document(folder, raw)
    assert check_merge(folder, capsys, recipe, snapshot(folder), raw) == 2


def test_huge_but_finite_weights_merge(sandboxes, capsys, base):
    raw = copy.deepcopy(base)
    for dataset in raw["data"]["datasets"]:
        dataset["weight"] = 1e308  # their sum is inf: the weights are scaled down before sampling
    folder = sandboxes()
    assert check_merge(folder, capsys, write_document(folder, raw), snapshot(folder), raw) == 0


def test_the_real_command_prints_no_traceback(sandboxes, base):
    """A few of the above through `python -m saemerge` in fresh processes, side by side."""
    folder = sandboxes()
    (folder / "garbage.yaml").write_bytes(bytes(range(256)))
    cases = {"garbage.yaml": None, "nan.yaml": ("merge", "scale", math.nan), "key.yaml": ("latent", "\x1b[31m", 1),
             "device.yaml": ("train", "device", "quantum")}
    for name, change in cases.items():
        if change:
            raw = copy.deepcopy(base)
            raw[change[0]][change[1]] = change[2]
            (folder / name).write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "saemerge", "merge", name, "--no-eval", "--quiet"], cwd=folder,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in cases]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert err.strip() and all(line.startswith("error: ") for line in err.strip().splitlines()), err
    assert sorted(p.name for p in folder.iterdir()) == sorted(cases)


@pytest.fixture(scope="module")
def merged(sandboxes, base):
    folder = sandboxes()
    assert main(["merge", str(write_document(folder, base)), "--no-eval", "--quiet", "--output", str(folder / "out")]) == 0
    return AutoModelForCausalLM.from_pretrained(folder / "out")


@settings(max_examples=20, **SETTINGS)
@given(batch=st.integers(1, 4), length=st.integers(0, 16), padded=st.integers(0, 16))
def test_merged_forward_any_length(merged, batch, length, padded):
    """Empty input too: [B, 0] gives [B, 0, vocab] logits (the sources' own forwards fail on it)."""
    ids = torch.randint(0, merged.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones_like(ids)
    mask[0, :min(padded, length)] = 0  # left padding in the first row
    with torch.no_grad():
        logits = merged(ids, attention_mask=mask).logits
    assert logits.shape == (batch, length, merged.config.vocab_size)
    assert torch.isfinite(logits[mask.bool()]).all()
