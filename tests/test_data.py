"""The streamed mixture: token-weighted, deterministic for a seed, clear errors for bad data."""

import json

import pytest
import torch

from saemerge import RecipeError
from saemerge.data import labelled_batches, token_batches
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


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_completion_rows_train_on_the_completion_only(tmp_path, tokenizer):
    rows = [{"question": f"In the beginning {i} plus one is", "answer": f" {i + 1}."} for i in range(20)]
    spec = DataSpec(datasets=[{"path": "json", "data_files": write_rows(tmp_path / "qa.jsonl", rows),
                               "prompt_column": "question", "text_column": "answer"}],
                    seq_len=24, prepend_bos=True, shuffle_buffer=1)
    ids, labels = next(labelled_batches(spec, tokenizer, 20, seed=0))
    assert ids.shape == labels.shape == (20, 24)
    bos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id
    for row, label in zip(ids.tolist(), labels.tolist()):
        i = int(tokenizer.decode(row[1:]).split()[3])
        example = [bos] + tokenizer(rows[i]["question"] + rows[i]["answer"])["input_ids"]
        n = len(example)
        assert row == example + [pad] * (24 - n)  # one example per row after BOS, right-padded
        assert tokenizer.decode([t for t, y in zip(row, label) if y != -100]) == f" {i + 1}."  # the loss on the answer
        assert label[n:] == [-100] * (24 - n)
    # The SAEs read prompt and answer as one packed document; without prepend_bos this tokenizer adds no BOS.
    packed = next(token_batches(spec.model_copy(update={"prepend_bos": None}), tokenizer, 4, seed=0))
    assert " plus one is " in tokenizer.decode(packed[0]) and packed[0, 0] != bos


def test_bad_prompt_completion_data_is_a_clear_error(tmp_path, tokenizer):
    qa = write_rows(tmp_path / "qa.jsonl", [{"q": "In the beginning " * 20, "a": " 1."}])
    with pytest.raises(RecipeError, match=r"^data.datasets.0.prompt_column: 'question' is not a column; expected one of "):
        next(labelled_batches(DataSpec(datasets=[{"path": "json", "data_files": qa, "prompt_column": "question",
                                                  "text_column": "a"}]), tokenizer, 2, 0))
    with pytest.raises(RecipeError, match=r"^merge.calibrate.datasets.0: a row of \d+ tokens .*expected at most data.seq_len \(16\)"):
        next(labelled_batches(DataSpec(datasets=[{"path": "json", "data_files": qa, "prompt_column": "q",
                                                  "text_column": "a"}], seq_len=16), tokenizer, 2, 0, "merge.calibrate"))
    no_bos = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    with pytest.raises(RecipeError, match=r"^data.prepend_bos: true, but the tokenizer has no BOS token"):
        next(token_batches(DataSpec(datasets=[{"path": "json", "data_files": qa, "text_column": "q"}],
                                    prepend_bos=True), no_bos, 2, 0))
