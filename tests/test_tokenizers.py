"""Sources with different tokenizers: byte-level BPE (as GPT-2, SmolLM2) and SentencePiece-style BPE with byte
fallback (as Gemma), aligned by the bytes their tokens spell; the merged model never reads the future."""

import json

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from saemerge.cli import main
from saemerge.hooks import run_to_layers
from saemerge.retokenize import Retokenizer, TokenBytes, read_prefixes, spelling_problem
from conftest import CODE, PROSE, make_model, recipe_dict, texts, train_briefly
from hub_server import hub_server  # noqa: F401  (the fixture local_hub needs)
from test_hub import local_hub  # noqa: F401

TEXT = "def größe(x):\n    return x ** 2  # ünïcödé, naïve café\n\nIn the beginning  God created the heaven."


def sentencepiece_tokenizer(vocab_size: int = 600, lowercase: bool = False) -> PreTrainedTokenizerFast:
    """Gemma's kind: spaces written as '▁', bytes without a token as <0xNN>, BOS added."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase()] * lowercase + [normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(texts(PROSE, 5) + texts(CODE, 3), trainers.BpeTrainer(vocab_size=vocab_size,
                                                                                 special_tokens=specials))
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def sentencepiece():
    return sentencepiece_tokenizer()


def test_tokens_spell_the_text(tokenizer, sentencepiece):
    for tok in (tokenizer, sentencepiece):
        for text in (TEXT, texts(CODE, 1)[0][:3000], texts(PROSE, 1)[0][:3000]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert TokenBytes(tok).spell(ids) == text.encode()
            # Where a token ends after a whole character, its fast tokenizer's offset mapping (in characters) says
            # the same in bytes (but for whitespace, which byte-level offsets trim).
            offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            whole = {len(text[:i].encode()) for i in range(len(text) + 1)}
            compared = [(len(text[:e].encode()), end) for (_, e), end in zip(offsets, TokenBytes(tok).ends(ids))
                        if end in whole and text[e - 1:e].strip()]
            assert len(compared) > len(ids) / 2 and all(a == b for a, b in compared)
        assert spelling_problem(tok) is None
    assert "its tokens spell" in spelling_problem(sentencepiece_tokenizer(lowercase=True))


def test_pairs_are_where_both_have_read_the_same_text(tokenizer, sentencepiece):
    retokenizer = Retokenizer(sentencepiece, tokenizer)
    ids = sentencepiece(texts(CODE, 1)[0][:1500])["input_ids"]
    other_ids, ours, theirs = retokenizer.pairs(ids)
    assert len(ours) > 0.3 * len(ids) and 0 not in ours and 0 not in theirs
    spell, spell_other = TokenBytes(sentencepiece).spell, TokenBytes(tokenizer).spell
    for p, q in zip(ours, theirs):
        assert spell(ids[:p + 1]) == spell_other(other_ids[:q + 1])
    assert spell_other(other_ids) == spell(ids)


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_a_sender_reads_each_prefix_on_its_own(family, tokenizer, sentencepiece):
    """What read_prefixes gives at t is the sender's residual after reading exactly the text of tokens 0..t in its
    own tokens, run alone (Gemma 3 here with a sliding window of 16, shorter than the texts); left padding reads
    nothing."""
    sender = make_model(family, len(tokenizer), seed=3)
    layers = ["transformer.h.1" if family == "gpt2" else "model.layers.1"]
    retokenizer = Retokenizer(sentencepiece, tokenizer)
    rows = [sentencepiece(TEXT)["input_ids"], sentencepiece(texts(PROSE, 1)[0][:150])["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    states, read = read_prefixes(sender, layers, retokenizer, ids, mask, width)
    spell = TokenBytes(sentencepiece).spell
    for b, row in enumerate(rows):
        pad = width - len(row)
        assert not read[b, :pad].any() and not read[b, pad].item()  # padding, and BOS (no text yet)
        for t in range(1, len(row)):
            prefix = retokenizer.read([spell(row[:t + 1])])[0]
            with torch.no_grad():
                alone = run_to_layers(sender, layers, torch.tensor([prefix]))[0][0, -1]
            assert read[b, pad + t]
            torch.testing.assert_close(states[0][b, pad + t], alone, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def cross_merge(tmp_path_factory, tokenizer, sentencepiece):
    """A saved merge: a Gemma 3 with the SentencePiece-style tokenizer (target) receiving from a GPT-2 with the
    byte-level one, both briefly trained, calibrated, evaluated by lm-eval."""
    root = tmp_path_factory.mktemp("cross")
    for name, family, tok in [("gemma", "gemma3_text", sentencepiece), ("gpt2", "gpt2", tokenizer)]:
        model = train_briefly(make_model(family, len(tok), seed=5), tok, steps=40)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    tasks = root / "tasks"
    tasks.mkdir()
    task = yaml.safe_load((PROSE.parents[2] / "tasks/saemerge_prose.yaml").read_text())
    task.update(task="tiny_prose", dataset_kwargs={"data_files": {"test": str(PROSE)}})
    (tasks / "tiny_prose.yaml").write_text(yaml.safe_dump(task))
    raw = recipe_dict(root / "gpt2", root / "gemma", root / "out", data__tokens=2048,
                      merge__calibrate={"steps": 2, "batch_tokens": 128})
    raw["merge"]["gates"] = ["latent"]
    raw["eval"] = {"tasks": ["tiny_prose"], "include_path": str(tasks), "limit": 2, "batch_size": 2,
                   "max_length": 64}
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["merge", str(root / "recipe.yaml"), "--quiet"]) == 0
    return root


def test_a_merge_across_tokenizers_saves_loads_generates_and_evaluates(cross_merge, sentencepiece):
    out = cross_merge / "out"
    config = json.loads((out / "config.json").read_text())
    assert [s["own_tokenizer"] for s in config["sources"]] == [True, False]  # a: GPT-2 reads with its own
    assert (out / "tokenizers/a/tokenizer.json").is_file() and (out / "tokenizers/b/tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == sentencepiece.get_vocab()  # it speaks the target's
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["sites"][0]["tokens"] < 2048  # only where both tokenizations end at the same byte

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([sentencepiece(TEXT)["input_ids"]])
    with torch.no_grad():
        merged = model(ids).logits
        model.config.scale = 0.0
        alone = model(ids).logits
        model.config.scale = 1.0
    assert merged.shape[-1] == len(sentencepiece) and (merged - alone).abs().max() > 1e-3  # features arrive

    prompts = [sentencepiece("def main():\n    return")["input_ids"], sentencepiece("In the")["input_ids"]]
    width = max(map(len, prompts))
    batch = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cached = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    fresh = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                           use_cache=False)
    assert torch.equal(cached, fresh)
    beams = dict(max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0)  # the cache's ids reordered too
    assert torch.equal(model.generate(batch[:1], attention_mask=mask[:1], **beams),
                       model.generate(batch[:1], attention_mask=mask[:1], use_cache=False, **beams))
    for row, prompt in zip(cached, prompts):  # left padding changes nothing
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(row[width - len(prompt):], alone[0])

    results = json.loads((out / "eval_results.json").read_text())["results"]["tiny_prose"]
    assert results["bits_per_byte"] > 0
    again = cross_merge / "again.json"
    assert main(["eval", str(out), "--tasks", "tiny_prose", "--include-path", str(cross_merge / "tasks"),
                 "--limit", "2", "--batch-size", "2", "--max-length", "64", "--output", str(again)]) == 0
    assert abs(json.loads(again.read_text())["results"]["tiny_prose"]["bits_per_byte"] - results["bits_per_byte"]) < 1e-6
    # The feature browser reads each source in its own tokens.
    assert main(["report", str(out), "--tokens", "256", "--latents", "4", "--quiet"]) == 0
    assert (out / "browser/index.html").is_file()


def test_pushed_to_the_hub_with_its_tokenizers(cross_merge, sentencepiece, local_hub, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(cross_merge / "out")
    model.push_to_hub("user/cross", token=local_hub.token)
    sent = local_hub.repos["user/cross"]["files"]
    assert {"tokenizers/a/tokenizer.json", "tokenizers/b/tokenizer.json", "retokenize.py"} <= set(sent)
    for path, data in sent.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    ids = torch.tensor([sentencepiece(TEXT)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_no_future_text_reaches_a_token(cross_merge, sentencepiece):
    """Changing the text after token t never changes t's logits, at every t, though the sender's tokenization of
    the words around t does change (a word cut at t is tokenized otherwise)."""
    model = AutoModelForCausalLM.from_pretrained(cross_merge / "out")
    ids = sentencepiece(TEXT)["input_ids"]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0]
        for t in range(1, len(ids) - 1):
            other = ids[:t + 1] + torch.randint(4 + 256, len(sentencepiece), (6,), generator=generator).tolist()
            changed = model(torch.tensor([other])).logits[0]
            torch.testing.assert_close(changed[:t + 1], full[:t + 1], atol=1e-5, rtol=1e-5)


def test_validate_names_the_own_tokenizer_and_mixing_heads_is_refused(zoo, tmp_path, write_recipe, capsys):
    raw = recipe_dict(zoo["gpt2"], zoo["gpt2_other_tok"], tmp_path / "out")  # target b
    assert main(["validate", str(write_recipe(raw))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"  a: {zoo['gpt2']}  layer 1 -> transformer.h.1  (own tokenizer: reads b's text in its tokens)"
    assert lines[2] == f"  b: {zoo['gpt2_other_tok']}  layer 1 -> transformer.h.1"
    raw["merge"]["heads"] = "router"
    assert main(["merge", str(write_recipe(raw)), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: merge.heads: 'router' mixes the sources' next-token distributions, which needs one "
                   "tokenizer, and 'a' reads with another than 'b'; expected heads: target"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bridge", ["linear", "cross_attention"])
def test_every_bridge_reads_across_tokenizers_without_the_future(bridge, cross_merge, sentencepiece, tmp_path):
    """The linear and cross-attention bridges on the same pair, calibrated: what they add changes the target's
    logits, reaches no earlier token, and generation with the cache equals generation without it."""
    raw = yaml.safe_load((cross_merge / "recipe.yaml").read_text())
    raw["merge"].update(bridge=bridge, gates=[], calibrate={"steps": 2, "batch_tokens": 128, "lr": 0.05})
    raw.pop("eval")
    raw["output"] = str(tmp_path / "out")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["merge", str(tmp_path / "recipe.yaml"), "--quiet"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = sentencepiece(TEXT)["input_ids"]
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0]
        changed = model(torch.tensor([ids[:12] + ids[20:30]])).logits[0]
        model.config.scale = 0.0
        alone = model(torch.tensor([ids])).logits[0]
        model.config.scale = 1.0
    assert (full - alone).abs().max() > 1e-4
    torch.testing.assert_close(changed[:12], full[:12], atol=1e-5, rtol=1e-5)
    prompt = torch.tensor([ids[:6]])
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
                       model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False))
