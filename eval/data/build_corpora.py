#!/usr/bin/env python3
"""Build the two small evaluation corpora used by saemerge's eval suite.

    python eval/data/build_corpora.py

writes gzip-compressed JSON Lines (one ``{"text": ..., "source": ...}``
object per line, one document per line) to

    eval/data/prose/{train,validation,test}.jsonl.gz
    eval/data/code/{train,validation,test}.jsonl.gz

* prose: the King James Bible, as printed by the ``bible`` command of Debian's
  ``bible-kjv`` package (``apt-get install bible-kjv``).  One document is one
  chapter, one verse per line, verse labels stripped.  Split by book (see
  PROSE_* below).
* code: a fixed subset of the Python standard library's own ``.py`` files of
  the running interpreter.  One document is one file.  Split by file with a
  hash of the file's relative path, so the split does not depend on the order
  in which the files are listed.

The output is deterministic: running the script twice on the same machine
gives byte-identical files (sorted order, gzip header with mtime=0 and no
file name).  Only the standard library is used.
"""

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS = ("train", "validation", "test")

# --------------------------------------------------------------------------
# prose: King James Bible
# --------------------------------------------------------------------------

# The 66 books in the order `bible` prints them.  `bible -f` labels verses
# with its own abbreviations (Ge, Exo, ..., Rev); we map them to these names
# by position and check the count.
BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua",
    "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings",
    "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah",
    "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
    "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus",
    "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John",
    "3 John", "Jude", "Revelation",
]
EXPECTED_CHAPTERS = 1189
EXPECTED_VERSES = 31102

# Split rule: test = 1 Timothy .. Revelation (the last 13 books);
# validation = these four Old Testament books, held out of the train range;
# train = every other book from Genesis .. 2 Thessalonians.
PROSE_FIRST_TEST_BOOK = "1 Timothy"
PROSE_VALIDATION_BOOKS = ("Ruth", "Esther", "Lamentations", "Jonah")

# `bible -f` (pretty-printing off) prints one verse per line: "Ge1:1 In the ..."
VERSE_RE = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")


def prose_split(book):
    if BOOKS.index(book) >= BOOKS.index(PROSE_FIRST_TEST_BOOK):
        return "test"
    if book in PROSE_VALIDATION_BOOKS:
        return "validation"
    return "train"


def read_bible():
    """Return [(book, chapter, [verse text, ...]), ...] in canonical order."""
    exe = shutil.which("bible")
    if exe is None:
        sys.exit(
            "build_corpora.py: the `bible` command was not found.\n"
            "It comes from Debian's bible-kjv package; install it with\n"
            "    apt-get update && apt-get install -y bible-kjv\n"
            "and run this script again."
        )
    # -f toggles pretty-printing OFF: one verse per line, no line wrapping.
    out = subprocess.run(
        [exe, "-f", "Gen1:1-Rev22:21"],
        check=True, capture_output=True, text=True, encoding="utf-8",
        env={**os.environ, "COLUMNS": "80"},
    ).stdout

    chapters = []          # [book, chapter, verses]
    abbrevs = []           # bible's book labels in order of appearance
    n_verses = 0
    for line in out.splitlines():
        if not line.strip():
            continue
        m = VERSE_RE.match(line)
        if m is None:
            sys.exit(f"build_corpora.py: unexpected line from `bible`: {line!r}")
        abbrev, chapter, _verse, text = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if not abbrevs or abbrevs[-1] != abbrev:
            abbrevs.append(abbrev)
        book = BOOKS[len(abbrevs) - 1]
        if not chapters or chapters[-1][0] != book or chapters[-1][1] != chapter:
            chapters.append((book, chapter, []))
        chapters[-1][2].append(text.strip())
        n_verses += 1

    if len(abbrevs) != len(BOOKS) or len(chapters) != EXPECTED_CHAPTERS \
            or n_verses != EXPECTED_VERSES:
        sys.exit(
            f"build_corpora.py: `bible` printed {len(abbrevs)} books, "
            f"{len(chapters)} chapters, {n_verses} verses; expected "
            f"{len(BOOKS)}, {EXPECTED_CHAPTERS}, {EXPECTED_VERSES}."
        )
    return chapters


def build_prose():
    docs = {s: [] for s in SPLITS}
    for book, chapter, verses in read_bible():
        docs[prose_split(book)].append(
            {"text": "\n".join(verses), "source": f"{book} {chapter}"}
        )
    return docs


# --------------------------------------------------------------------------
# code: Python standard library
# --------------------------------------------------------------------------

# Directory names skipped anywhere in the tree.  Besides tests, IDLE, lib2to3
# and installed packages, `encodings` is skipped because it is mostly
# generated codec tables (data, not code).
CODE_EXCLUDED_DIRS = {
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
    "__pycache__", "encodings",
}
CODE_MAX_FILE_BYTES = 200_000
# The remaining files (~8.6 MB for CPython 3.11) are sub-sampled to keep
# the corpus around 5 MB: a file is kept when its "keep" hash bucket
# (0..99) is below CODE_KEEP_PERCENT.
CODE_KEEP_PERCENT = 60
# Split buckets (0..99) of a second, independent hash of the path.
CODE_TRAIN_BELOW = 85       # 0..84  -> train      (85 %)
CODE_VALIDATION_BELOW = 90  # 85..89 -> validation (5 %), 90..99 -> test (10 %)


def bucket(salt, relpath):
    """A number in 0..99 from the SHA-1 of salt + relative path."""
    digest = hashlib.sha1(f"{salt}:{relpath}".encode("utf-8")).hexdigest()
    return int(digest, 16) % 100


def code_split(relpath):
    b = bucket("split", relpath)
    if b < CODE_TRAIN_BELOW:
        return "train"
    if b < CODE_VALIDATION_BELOW:
        return "validation"
    return "test"


def stdlib_files():
    """Sorted relative paths (with '/') of the stdlib .py files we use."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in CODE_EXCLUDED_DIRS]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            full = os.path.join(dirpath, name)
            if os.path.getsize(full) > CODE_MAX_FILE_BYTES:
                continue
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if bucket("keep", rel) < CODE_KEEP_PERCENT:
                paths.append(rel)
    return root, sorted(paths)


def build_code():
    root, paths = stdlib_files()
    docs = {s: [] for s in SPLITS}
    for rel in paths:
        with open(os.path.join(root, rel), encoding="utf-8", newline="") as f:
            text = f.read()
        if not text.strip():
            continue  # empty __init__.py files carry nothing
        docs[code_split(rel)].append({"text": text, "source": rel})
    return docs


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

def write_jsonl_gz(path, records):
    """Write records as JSON Lines, gzip-compressed, byte-for-byte reproducibly."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as raw:
        # filename="" and mtime=0 keep the gzip header free of name and time.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                           compresslevel=9, mtime=0) as gz:
            for rec in records:
                line = json.dumps(rec, ensure_ascii=False, sort_keys=True)
                gz.write((line + "\n").encode("utf-8"))
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=HERE,
                        help="output directory (default: eval/data)")
    args = parser.parse_args()

    print(f"code corpus from CPython {sys.version.split()[0]} stdlib at "
          f"{sysconfig.get_paths()['stdlib']}")
    for corpus, docs in (("prose", build_prose()), ("code", build_code())):
        for split in SPLITS:
            path = os.path.join(args.out, corpus, f"{split}.jsonl.gz")
            write_jsonl_gz(path, docs[split])
            chars = sum(len(d["text"]) for d in docs[split])
            print(f"{corpus:5s} {split:10s} {len(docs[split]):5d} docs "
                  f"{chars:9d} chars  {os.path.getsize(path):8d} bytes gz")


if __name__ == "__main__":
    main()
