"""The streamed mixture: token-weighted, deterministic for a seed, clear errors for bad data."""

import json

import pytest
import torch

from saemerge import RecipeError
from saemerge.data import token_batches
from saemerge.recipe import DataSpec


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_weights_are_over_tokens_not_documents(tmp_path, tokenizer):
    short = write_jsonl(tmp_path / "short.jsonl", ["In the beginning."] * 400)          # many short documents
    long = write_jsonl(tmp_path / "long.jsonl", ["def f(x):\n    return x\n" * 200] * 4)  # a few long ones
    spec = DataSpec(datasets=[{"path": "json", "data_files": short, "weight": 1},
                              {"path": "json", "data_files": long, "weight": 3}], seq_len=16, shuffle_buffer=10)
    batches = token_batches(spec, tokenizer, batch_size=50, seed=0)
    rows = torch.cat([next(batches) for _ in range(8)])
    code_token = tokenizer("def")["input_ids"][0]
    share = (rows == code_token).any(-1).float().mean().item()
    assert 0.65 < share < 0.85  # 3 : 1 in tokens, though the short file has 100 times more documents
    again = token_batches(spec, tokenizer, batch_size=50, seed=0)
    assert torch.equal(torch.cat([next(again) for _ in range(8)]), rows)


def test_bad_data_is_a_clear_error(tmp_path, tokenizer):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "a"])
    with pytest.raises(RecipeError, match=r"data.datasets.0: holds 2 tokens; expected at least one sequence"):
        next(token_batches(DataSpec(datasets=[{"path": "json", "data_files": empty}], seq_len=16), tokenizer, 2, 0))
    with pytest.raises(RecipeError, match=r"data.datasets.0: cannot open dataset 'json'"):
        next(token_batches(DataSpec(datasets=[{"path": "json", "data_files": str(tmp_path / "none.jsonl")}]),
                           tokenizer, 2, 0))
