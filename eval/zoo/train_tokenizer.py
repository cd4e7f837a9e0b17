#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer shared by the eval zoo models.

    python eval/zoo/train_tokenizer.py

Trains on the TRAIN splits of eval/data/prose and eval/data/code (build them
first with eval/data/build_corpora.py), with equal weight: both corpora
contribute the same number of characters (the size of the smaller one; the
larger one is cut at a document boundary in file order).  Documents are read
streaming from the .jsonl.gz files and fed to the trainer alternately.

Vocabulary: 8192 tokens, id 0 = "<|endoftext|>" (also bos/eos/unk), then the
256 byte-level symbols, then the merges.  Saved in Hugging Face format to
eval/zoo/tokenizer/ and loadable with AutoTokenizer.from_pretrained.

The result is deterministic for the same corpora and `tokenizers` version.
"""

import argparse
import gzip
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(os.path.dirname(HERE), "data")
CORPORA = ("prose", "code")
VOCAB_SIZE = 8192
EOT = "<|endoftext|>"


def read_texts(path):
    """Yield the "text" field of each line of a .jsonl.gz file, streaming."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def count_chars(path):
    return sum(len(t) for t in read_texts(path))


def capped(texts, budget):
    """Yield texts until `budget` characters have been yielded."""
    used = 0
    for text in texts:
        if used >= budget:
            return
        used += len(text)
        yield text


def balanced_training_texts(data_dir):
    """Alternate documents from each corpus's train split, equal characters."""
    paths = [os.path.join(data_dir, c, "train.jsonl.gz") for c in CORPORA]
    for p in paths:
        if not os.path.exists(p):
            sys.exit(f"train_tokenizer.py: {p} is missing; run "
                     "eval/data/build_corpora.py first.")
    budget = min(count_chars(p) for p in paths)
    streams = [capped(read_texts(p), budget) for p in paths]
    while streams:
        for s in list(streams):
            text = next(s, None)
            if text is None:
                streams.remove(s)
            else:
                yield text


def build_tokenizer(data_dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOT],                     # -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(balanced_training_texts(data_dir), trainer=trainer)
    assert tok.token_to_id(EOT) == 0
    return tok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DATA, help="corpora directory")
    parser.add_argument("--out", default=os.path.join(HERE, "tokenizer"))
    args = parser.parse_args()

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = build_tokenizer(args.data)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT, eos_token=EOT, unk_token=EOT,
        clean_up_tokenization_spaces=False,   # keep decode(encode(x)) == x
    )
    hf.save_pretrained(args.out)

    # Check: reload and round-trip a bit of each corpus's validation split.
    loaded = AutoTokenizer.from_pretrained(args.out)
    assert len(loaded) == VOCAB_SIZE, len(loaded)
    assert loaded.convert_tokens_to_ids(EOT) == 0
    for corpus in CORPORA:
        path = os.path.join(args.data, corpus, "validation.jsonl.gz")
        sample = next(read_texts(path))[:2000]
        ids = loaded(sample)["input_ids"]
        assert loaded.decode(ids) == sample, f"{corpus} round trip failed"
        print(f"{corpus}: round trip ok ({len(sample)} chars -> {len(ids)} tokens)")
    print(f"saved {len(loaded)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
