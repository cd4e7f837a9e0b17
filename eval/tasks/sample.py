"""Fixed samples of the test splits for models too slow to score them whole on a CPU (Gemma-3-270m: its
262k-token head costs ~5 ms per token here). Documents are cut into chunks of whole lines (~2,000 characters)
and every n-th chunk is kept, so the sample spreads over every document, not only their openings."""

from datasets import Dataset


def _every_nth_chunk(docs, n: int, size: int = 2000) -> Dataset:
    chunks = []
    for text in docs["text"]:
        chunk = ""
        for line in text.splitlines(keepends=True):
            chunk += line
            if len(chunk) >= size:
                chunks.append(chunk)
                chunk = ""
        if chunk.strip():
            chunks.append(chunk)
    return Dataset.from_dict({"text": chunks[::n]})


def prose(docs):  # 182k characters -> ~45k
    return _every_nth_chunk(docs, 4)


def code(docs):  # 562k characters -> ~40k
    return _every_nth_chunk(docs, 14)
