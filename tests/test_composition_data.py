"""The composition benchmark's data (eval/composition/data.py): held-out keys are never composed in any training
stream, K never sees arithmetic, S never sees a key, and every digit is a token of its own."""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval" / "composition"))
from data import Task, batch, stream  # noqa: E402


def test_held_out_keys_are_composed_nowhere_and_each_model_sees_only_its_own_kind():
    task = Task(n_keys=200, seed=3)
    held_out = set(task.split_keys["test"]) | set(task.split_keys["valid"])
    keys = set(task.keys)
    composed = set()
    for example in (e for _, e in zip(range(3000), stream(task, "joint", 0))):
        words = set(example.text.split())
        if "+" in words or "-" in words:  # arithmetic: plain (S's) or over a key (composition)
            composed |= words & keys
    assert composed and not composed & held_out  # compositions over train keys only
    assert composed <= set(task.split_keys["train"])
    knowledge = [e.text for _, e in zip(range(3000), stream(task, "knowledge", 0))]
    assert not any({"+", "-"} & set(t.split()) for t in knowledge)
    assert {w for t in knowledge for w in t.split()} >= held_out  # K learns every key, held-out ones included
    assert not any(set(e.text.split()) & keys for _, e in zip(range(3000), stream(task, "skill", 0)))
    assert {len(v) for v in task.split_keys.values()} == {90, 10, 100}


def test_numbers_are_digit_tokens_and_answers_are_right():
    task = Task(n_keys=50, seed=0)
    tok = task.tokenizer()
    rng = random.Random(0)
    for _ in range(200):
        e = task.composition(rng, "test")
        ids = tok(e.text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        words = e.prompt.split()
        op_at = words.index("+") if "+" in words else words.index("-")
        b = int("".join(w for w in words[op_at + 1:] if w.isdigit()))
        value = task.values[e.key]
        assert int(e.answer.replace(" ", "")) == (value + b if words[op_at] == "+" else value - b)
    assert tok.tokenize("1 2 3") == ["1", "2", "3"] and tok.tokenize("123") == ["1", "2", "3"]
    ids, labels = batch(stream(task, "joint", 1), tok, 8, 16)
    assert ids.shape == labels.shape == (8, 16) and (ids[:, 0] == tok.bos_token_id).all()
    padding = ids == tok.pad_token_id
    assert padding.any() and (labels[padding] == -100).all()
    for i in range(8):  # the loss is on the answer and its ' .' only: the labelled tokens end the row's text
        taken = ids[i][labels[i] != -100].tolist()
        assert taken[-1] == tok.convert_tokens_to_ids(".") and 2 <= len(taken) <= 4


def test_one_digit_values_leave_the_keys_and_the_skill_data_as_they_were():
    wide, narrow = Task(n_keys=200, seed=3), Task(n_keys=200, seed=3, values=10)
    assert wide.split_keys == narrow.split_keys and set(narrow.values.values()) == set(range(10))
    assert len(set(wide.values.values())) > 10
    skill = lambda task: [e.text for _, e in zip(range(200), stream(task, "skill", 0))]
    assert skill(wide) == skill(narrow)  # S is the same model in both variants
