"""Tiny real models of several families, a real tokenizer and real text, built once per test session."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from saemerge import build_merged, load_source, parse_recipe, train_from_recipe, validate

REPO = Path(__file__).resolve().parent.parent
PROSE = REPO / "eval/data/prose/validation.jsonl.gz"
CODE = REPO / "eval/data/code/validation.jsonl.gz"
PROMPTS = ["def main():\n    return", "In the beginning God created", "x"]

# sparsify decodes with Triton whenever triton imports (CUDA builds of torch bring it), and Triton needs a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

# Small configs of different families, shapes and widths; every block list is found without a family table.
FAMILIES = {
    "gpt2": dict(model_type="gpt2", n_layer=3, n_embd=32, n_head=2, n_positions=128),
    "llama": dict(model_type="llama", num_hidden_layers=3, hidden_size=48, intermediate_size=96,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128),
    "gemma3_text": dict(model_type="gemma3_text", num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                        sliding_window=16),
    "gpt_neox": dict(model_type="gpt_neox", num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                     num_attention_heads=2, max_position_embeddings=128),
    "qwen2": dict(model_type="qwen2", num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128),
}
BLOCK_PATHS = {"gpt2": "transformer.h", "llama": "model.layers", "gemma3_text": "model.layers",
               "gpt_neox": "gpt_neox.layers", "qwen2": "model.layers"}


def texts(path: Path, n: int | None = None) -> list[str]:
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line)["text"] for line in f]
    return rows[:n] if n else rows


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(PROSE, 5) + texts(CODE, 3), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", clean_up_tokenization_spaces=False)


def make_model(family: str, vocab_size: int, seed: int = 0):
    kwargs = dict(FAMILIES[family])
    config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=vocab_size, bos_token_id=0, eos_token_id=0,
                                  pad_token_id=0, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def train_briefly(model, tokenizer, steps: int = 60):
    """A few seconds of next-token training on real text: a tiny model that is better than chance."""
    ids = torch.tensor(tokenizer("\n".join(texts(PROSE, 3) + texts(CODE, 2)))["input_ids"])
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 64, (8,), generator=generator)
        batch = torch.stack([ids[s:s + 64] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(400)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, tokenizer):
    """{family: folder} of tiny random models saved with the shared tokenizer; also 'gpt2_b' (another seed),
    'gpt2_trained' (briefly trained) and 'gpt2_other_tok' (a different tokenizer)."""
    root = tmp_path_factory.mktemp("zoo")
    folders = {}
    for i, family in enumerate([*FAMILIES, "gpt2_b"]):
        model = make_model(family.removesuffix("_b"), len(tokenizer), seed=i)
        folders[family] = root / family
        model.save_pretrained(folders[family])
        tokenizer.save_pretrained(folders[family])
    folders["gpt2_trained"] = root / "gpt2_trained"
    train_briefly(make_model("gpt2", len(tokenizer), seed=7), tokenizer).save_pretrained(folders["gpt2_trained"])
    tokenizer.save_pretrained(folders["gpt2_trained"])
    other = root / "gpt2_other_tok"
    make_model("gpt2", len(tokenizer)).save_pretrained(other)
    train_tokenizer(300).save_pretrained(other)
    folders["gpt2_other_tok"] = other
    return folders


@pytest.fixture(scope="session")
def lora(zoo, tmp_path_factory):
    """A LoRA adapter on the tiny Llama with non-zero B (so it changes the model), and the PEFT model."""
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(zoo["llama"])
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False)).eval()
    peft_model.save_pretrained(folder)
    return folder, peft_model


def write_gguf(model, tokenizer, path: Path, architecture: str = "gpt2") -> Path:
    """A GPT-2 written as llama.cpp's converter writes one (float32 tensors, byte-level BPE vocabulary)."""
    import gguf
    import numpy as np

    cfg = model.config
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    vocab = tokenizer.get_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(sorted(vocab, key=vocab.get))
    writer.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        if name == "lm_head.weight" or names.get_name(base) is None:
            continue  # tied to the embedding
        data = tensor.float().numpy()
        if suffix == "weight" and base.endswith(("c_attn", "c_proj", "c_fc")):
            data = data.T  # GPT-2's Conv1D stores [in, out]; GGUF stores [out, in]
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def recipe_dict(a: Path, b: Path, output: Path, **overrides) -> dict:
    raw = {
        "name": "tiny-merge",
        "models": [{"name": "a", "model": str(a), "layer": 1}, {"name": "b", "model": str(b), "layer": 1}],
        "latent": {"size": 64, "activation": "topk", "k": 8, "l1": 0.0, "align": 1.0, "cross": 0.5},
        "data": {"datasets": [{"path": "json", "data_files": str(PROSE), "weight": 0.5},
                              {"path": "json", "data_files": str(CODE), "weight": 0.5}],
                 "seq_len": 32, "tokens": 4096, "shuffle_buffer": 8},
        "train": {"batch_tokens": 512, "lr": 3e-3, "seed": 0, "eval_tokens": 1024},
        "merge": {"target": "b", "combine": "mean", "scale": 1.0},
        "output": str(output),
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        raw[section][field] = value
    return raw


@pytest.fixture
def write_recipe(tmp_path):
    def write(raw: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path
    return write


@pytest.fixture(scope="session")
def merges(zoo, tmp_path_factory):
    """Three wirings of one SAE pair (gpt2 -> llama): one receiver; every source receiving with gates and a
    router; and two layers per source (two sites)."""
    built = {}
    for kind, overrides, layers in [
        ("target", {}, 1),
        ("router", {"merge__heads": "router", "merge__gates": ["latent", "token"]}, 1),
        ("two_sites", {}, [0, 2]),
    ]:
        raw = recipe_dict(zoo["gpt2"], zoo["llama"], tmp_path_factory.mktemp(kind) / "out", data__tokens=1024,
                          **overrides)
        for model in raw["models"]:
            model["layer"] = layers
        recipe = parse_recipe(raw)
        paths = validate(recipe)
        sources = {s.name: load_source(s) for s in recipe.models}
        saes, _ = train_from_recipe(recipe, sources, paths, AutoTokenizer.from_pretrained(zoo["gpt2"]), progress=False)
        model = build_merged(recipe, sources, saes, paths)
        if kind == "router":  # calibrated-looking parameters, so that gates and router matter
            torch.manual_seed(0)
            for p in model.calibration_parameters():
                p.data.normal_(0, 0.5)
        built[kind] = model
    return built


@pytest.fixture(scope="session")
def batch(zoo):
    tok = AutoTokenizer.from_pretrained(zoo["gpt2"])
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    return tok(PROMPTS, return_tensors="pt", padding=True)


SITES = {"gpt2": [0, "transformer.h.1.attn", "transformer.h.1.mlp", 1, 2],
         "llama": [0, "model.layers.1.self_attn", "model.layers.1.mlp", 1, 2]}


@pytest.fixture(scope="session")
def dictionaries(zoo, tmp_path_factory):
    """dictionaries(family, size=64) -> a `saemerge train-saes` folder: SAEs (TopK, k 8) at five sites of a tiny
    model (block 0, attention and MLP outputs of block 1, blocks 1 and 2), trained for a few seconds on real text.
    gpt2: the briefly trained GPT-2; llama: the random tiny Llama. Built once per (family, size)."""
    from saemerge.dictionaries import train_dictionaries
    from saemerge.recipe import SAERecipe

    built = {}

    def make(family: str = "gpt2", size: int = 64) -> Path:
        if (family, size) not in built:
            output = tmp_path_factory.mktemp(f"dicts-{family}-{size}") / "dicts"
            model = zoo["gpt2_trained" if family == "gpt2" else family]
            raw = {"name": f"dicts-{family}", "models": [{"name": "m", "model": str(model), "layer": SITES[family]}],
                   "latent": {"size": size, "k": 8},
                   "data": {"datasets": [{"path": "json", "data_files": str(PROSE)},
                                         {"path": "json", "data_files": str(CODE)}],
                            "seq_len": 32, "tokens": 8192, "shuffle_buffer": 8},
                   "train": {"batch_tokens": 512, "lr": 3e-3, "eval_tokens": 1024},
                   "output": str(output)}
            built[family, size] = train_dictionaries(parse_recipe(raw, schema=SAERecipe), progress=False)
        return built[family, size]
    return make
