#!/usr/bin/env python3
"""Write the composition task's training data as JSONL files, for recipes (`saemerge merge`) to read:

    python eval/composition/write_data.py --output eval/composition/runs/data

- sources.jsonl, {"text"}: everything K and S read (key statements, S's skill, compositions over the train keys, in
  equal shares), the SAEs' data, as the benchmark trains its SAEs on;
- compositions.jsonl, {"prompt", "answer"}: compositions over the train keys, the answer (" 57 .") apart, for
  `merge.calibrate.datasets` with `prompt_column`: the loss on the answer only, as the benchmark trains bridges.

Held-out keys appear in neither file. The same streams and seeds as benchmark.py; `--skill-model` writes the
real-model case's (copy_task.py). score.py scores a merged model on the held-out and seen keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import make_task, stream, task_arguments  # noqa: E402


def main():
    parser = task_arguments(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--output", type=Path, required=True, help="folder the two files are written to")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of each file (streams repeat them)")
    args = parser.parse_args()
    task = make_task(args)
    args.output.mkdir(parents=True, exist_ok=True)
    files = {"sources.jsonl": (stream(task, "joint", args.seed), lambda e: {"text": e.text}),
             "compositions.jsonl": (stream(task, "composition", args.seed + 1),
                                    lambda e: {"prompt": e.prompt, "answer": e.text[len(e.prompt):]})}
    for name, (examples, as_row) in files.items():
        with open(args.output / name, "w") as f:
            for _, e in zip(range(args.rows), examples):
                f.write(json.dumps(as_row(e)) + "\n")
        print(f"wrote {args.rows} rows to {args.output / name}")


if __name__ == "__main__":
    main()
