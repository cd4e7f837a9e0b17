#!/usr/bin/env python3
"""Mutation testing of the numeric core: does the test suite notice wrong maths?

    python eval/mutation.py                                   # TARGETS below, tests/test_sae.py, 2 jobs
    python eval/mutation.py --limit 15                        # 15 mutants spread evenly over the list
    python eval/mutation.py saemerge/losses.py:fvu,cosine --tests "python -m pytest -x -q tests/test_sae.py"
    python eval/mutation.py --only init_from_data --rev HEAD  # mutants whose description contains the text
    python eval/mutation.py --retry eval/results/mutation.json --out eval/results/mutation_retry.json
                                                              # the survivors of a run again, after new tests

A target is `path` (every function and method in the file), `path:f,Class.method` (just those; a class means
all its methods) or `path:-Class.save` (the file less those). Each mutant makes ONE change inside a target
function, never in docstrings, annotations, decorators, f-strings or `raise` statements:
    + <-> -    * <-> /    ** -> *    & <-> |    (augmented assignments too; @ is kept)
    < <-> <=   > <-> >=   == <-> !=   is <-> is not   and <-> or   `not x` -> x   `-x` -> x
    0 -> 1, 1 -> 0, other ints c -> c + 1, floats c -> c * 2, True <-> False
    calls named sum <-> mean, any <-> all, min <-> max
    a bare call statement -> pass;  the body of an `if` -> pass
The module re-unparsed with the change (ast.unparse) replaces the file in a temporary copy of the repository
(the working tree's files, or those of `--rev`), and the test command runs there with cwd and PYTHONPATH the
copy and this interpreter first on PATH as `python`. A failing run or a timeout kills the mutant; one that does
not compile or unparses to the original (or to an earlier mutant) is "invalid". First the unmutated copy must
pass, and a copy whose target files raise on import must fail (else the tests do not test the copy).
Results: eval/results/mutation.json.
"""

from __future__ import annotations

import argparse, ast, copy, datetime, json, os, queue, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The numeric core: every function that computes a number a user sees (SAE, loss, training loop, metrics,
# harvesting, the bridge, the head mixture). Edit freely.
TARGETS = ["saemerge/sae.py:-SparseAutoencoder.save,-SparseAutoencoder.load",
           "saemerge/losses.py",
           "saemerge/metrics.py",
           "saemerge/train.py:resampling_due,lr_factor,init_batches,resample_dead,init_saes,Trainer.resample,Trainer.step",
           "saemerge/harvest.py:activations,shuffled",
           "saemerge/sae_bridge.py:scaled_residuals,SAEBridge.__init__,SAEBridge.send,SAEBridge.receive",
           "saemerge/heads.py:mix_heads"]
# The fast tests of the maths; the two end-to-end merges of test_training_loop.py are left out (a minute per
# surviving mutant instead of seconds), which can only make more mutants survive.
# One thread per run: the jobs share the cores.
TESTS = ("OMP_NUM_THREADS=1 python -m pytest -x -q -p no:cacheprovider tests/test_maths.py tests/test_training_loop.py"
         " tests/test_sae.py tests/test_stream.py::test_shuffle_keeps_every_token_and_its_pairing"
         " -k 'not default_latent_settings and not relu_codes'")

OPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
       ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
       ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
       ast.And: ast.Or, ast.Or: ast.And}
SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.BitAnd: "&", ast.BitOr: "|",
          ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is",
          ast.IsNot: "is not", ast.And: "and", ast.Or: "or"}
NAMES = {"sum": "mean", "mean": "sum", "any": "all", "all": "any", "min": "max", "max": "min"}


def chosen(tree: ast.Module, spec: str) -> list[tuple[str, ast.AST]]:
    """(qualified name, node) of the functions and methods that target `spec` names, in file order."""
    found, stack = {}, [(n, "") for n in tree.body]
    while stack:
        node, prefix = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[prefix + node.name] = node
        if isinstance(node, ast.ClassDef):
            stack += [(n, prefix + node.name + ".") for n in node.body]
    names = [n for n in spec.partition(":")[2].split(",") if n]
    for name in names:
        if name.lstrip("-") not in found:
            sys.exit(f"mutation.py: target {spec!r}: no function, class or method {name.lstrip('-')!r} in that file")
    keep, drop = [n for n in names if n[0] != "-"], [n[1:] for n in names if n[0] == "-"]
    under = lambda q, names: any(q == n or q.startswith(n + ".") for n in names)
    return sorted(((q, f) for q, f in found.items() if not isinstance(f, ast.ClassDef)
                   and (under(q, keep) if keep else not under(q, drop))), key=lambda qf: qf[1].lineno)


def walk(node):
    """The nodes under `node` that may be mutated, in a fixed order."""
    if isinstance(node, (ast.JoinedStr, ast.Raise)) or (isinstance(node, ast.Expr) and isinstance(
            node.value, ast.Constant) and isinstance(node.value.value, str)):  # messages and docstrings
        return
    yield node
    for field, value in ast.iter_fields(node):
        if field not in ("annotation", "returns", "decorator_list"):
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    yield from walk(child)


def changed(node, **fields):
    new = copy.copy(node)
    new.__dict__.update(fields)
    return new


def mutants_of(node):
    """(replacement, label or None) for each mutant of this node; `old -> new` in full is the label where short."""
    if isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp)) and type(node.op) in OPS:
        new = OPS[type(node.op)]
        yield changed(node, op=new()), f"{SYMBOL[type(node.op)]} -> {SYMBOL[new]}"
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in OPS:
                new = OPS[type(op)]
                yield changed(node, ops=node.ops[:i] + [new()] + node.ops[i + 1:]), f"{SYMBOL[type(op)]} -> {SYMBOL[new]}"
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        yield node.operand, None
    elif isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float)):
        v = node.value
        yield ast.Constant(type(v)(not v if isinstance(v, bool) else 1 if v == 0 else 0 if v == 1 else
                                   v + 1 if isinstance(v, int) else v * 2)), None
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in NAMES:
        yield changed(node, func=ast.Name(NAMES[node.func.id], ast.Load())), f"{node.func.id}( -> {NAMES[node.func.id]}("
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in NAMES:
        yield (changed(node, func=changed(node.func, attr=NAMES[node.func.attr])),
               f".{node.func.attr}( -> .{NAMES[node.func.attr]}(")
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        yield ast.Pass(), f"{short(node)} -> pass"
    elif isinstance(node, ast.If) and not all(isinstance(s, ast.Pass) for s in node.body):
        yield changed(node, body=[ast.Pass()]), f"if {short(node.test)}: ... -> if {short(node.test)}: pass"


def short(node, width=60):
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def sites(source: str, spec: str):
    """(tree, [(function, node, replacement, label)]) for every mutant of one target; the tree parsed afresh."""
    tree, out = ast.parse(source), []
    for qualname, fn in chosen(tree, spec):
        for node in walk(fn):
            for new, label in mutants_of(node):
                full = f"{short(node, 1000)} -> {short(new, 1000)}"
                out.append((qualname, node, new, full if label is None or len(full) <= 90 else label))
    return tree, out


def mutate(source: str, spec: str, index: int) -> str:
    tree, found = sites(source, spec)
    node, new = found[index][1:3]
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is node:
                setattr(parent, field, new)
            elif isinstance(value, list):
                value[:] = [new if v is node else v for v in value]
    return ast.unparse(tree)


def make_copy(dest: Path, rev: str | None) -> None:
    if rev:
        archive = subprocess.run(["git", "-C", REPO, "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
        return
    files = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():  # tracked files deleted in the working tree are left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


def run_tests(root: Path, files: dict[str, str], args) -> tuple[str, float, str]:
    """Write `files` {path: text} into the copy, run the tests, restore: (killed|survived|timeout, seconds, output)."""
    originals = {p: (root / p).read_text() for p in files}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
               PYTHONDONTWRITEBYTECODE="1", PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    start = time.time()
    try:
        for p, text in files.items():
            (root / p).write_text(text)
        proc = subprocess.Popen(args.tests, shell=True, cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output = proc.communicate(timeout=args.timeout)[0]
            status = "killed" if proc.returncode else "survived"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the test command's own process group, nothing else
            output, status = proc.communicate()[0], "timeout"
    finally:
        for p, text in originals.items():
            (root / p).write_text(text)
    return status, time.time() - start, output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", default=TARGETS, help="path or path:func,Class.method (default: TARGETS)")
    ap.add_argument("--tests", default=TESTS, help=f"test command, run in the copy (default: {TESTS})")
    ap.add_argument("--jobs", type=int, default=2, help="parallel workers, each with its own copy (default 2)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per test run; a timeout kills (default 120)")
    ap.add_argument("--limit", type=int, help="run N mutants spread evenly over the list")
    ap.add_argument("--only", help="run only mutants whose `file:line label (function)` contains this text")
    ap.add_argument("--rev", help="copy this git revision instead of the working tree")
    ap.add_argument("--retry", help="run only the mutants that survived in this earlier results file (after new tests)")
    ap.add_argument("--out", default=str(REPO / "eval/results/mutation.json"), help="JSON results file")
    args = ap.parse_args()
    began, copies = time.time(), [Path(tempfile.mkdtemp(prefix=f"mutation{i}-")) for i in range(max(1, args.jobs))]
    try:
        make_copy(copies[0], args.rev)
        sources, mutants = {}, []
        for spec in args.targets:
            path = spec.partition(":")[0]
            if not (copies[0] / path).is_file() or path in sources:
                sys.exit(f"mutation.py: target {spec!r}: " + (f"{path} is in another target too" if path in sources
                         else f"no file {path} in the {'revision ' + args.rev if args.rev else 'working tree'}"))
            sources[path] = (copies[0] / path).read_text()
            lines = sources[path].splitlines()
            for i, (fn, node, _, label) in enumerate(sites(sources[path], spec)[1]):
                mutants.append(dict(file=path, line=node.lineno, col=node.col_offset, function=fn, label=label,
                                    source_line=lines[node.lineno - 1].strip(), spec=spec, index=i))
        total = len(mutants)
        describe = lambda m: f"{m['file']}:{m['line']}  {m['label']}  ({m['function']})"
        mutants = [m for m in mutants if not args.only or args.only in describe(m)]
        if args.retry:
            earlier = json.loads(Path(args.retry).read_text())["survivors"]
            again = {f"{m['file']}:{m['line']}  {m['label']}  ({m['function']})" for m in earlier}
            mutants = [m for m in mutants if describe(m) in again]
        if args.limit and len(mutants) > args.limit:
            mutants = [mutants[i * len(mutants) // args.limit] for i in range(args.limit)]
        print(f"{total} mutants in {len(sources)} files; running {len(mutants)}; tests: {args.tests}", flush=True)
        for c in copies[1:]:
            make_copy(c, args.rev)
        free = queue.Queue()
        for c in copies:
            free.put(c)

        def job(files):
            c = free.get()
            try:
                return run_tests(c, files, args)
            finally:
                free.put(c)

        with ThreadPoolExecutor(len(copies)) as pool:
            broken = {p: 'raise RuntimeError("mutation.py: deliberately broken")\n' + s for p, s in sources.items()}
            (base, base_s, out), (bad, _, _) = pool.map(job, [{}, broken])
            if base != "survived":
                sys.exit(out[-3000:] + f"\nmutation.py: the unmutated copy fails the test command ({base}): fix that first")
            if bad == "survived":
                sys.exit("mutation.py: the tests pass with every target file broken: they do not import the copy's "
                         "modules (PYTHONPATH?), or none of the targets")
            print(f"baseline passes in {base_s:.1f}s; broken target files fail", flush=True)
            counts, survivors, futures, seen = dict(tried=0, killed=0, survived=0, invalid=0, timeouts=0), [], {}, set()
            seen.update(ast.unparse(ast.parse(s)) for s in sources.values())
            for m in mutants:
                text = mutate(sources[m["file"]], m["spec"], m["index"])
                try:
                    compile(text, m["file"], "exec")
                except SyntaxError:
                    text = None
                if text is None or text in seen:
                    counts["invalid"] += 1
                    print(f"[invalid ] {describe(m)}")
                    continue
                seen.add(text)
                futures[pool.submit(job, {m["file"]: text})] = m
            try:
                for n, future in enumerate(as_completed(futures), 1):
                    m, (status, seconds, _) = futures[future], future.result()
                    counts["tried"] += 1
                    counts["survived" if status == "survived" else "killed"] += 1
                    counts["timeouts"] += status == "timeout"
                    print(f"[{n:3}/{len(futures)}] {status:8} {seconds:5.1f}s  {describe(m)}", flush=True)
                    survivors += [m] if status == "survived" else []
            except KeyboardInterrupt:
                for future in futures:
                    future.cancel()  # the runs under way finish, then the copies are removed
                raise
    finally:
        for c in copies:
            shutil.rmtree(c, ignore_errors=True)

    elapsed = time.time() - began
    survivors.sort(key=lambda m: (m["file"], m["line"], m["col"]))
    print(f"\n{counts['tried']} tried: {counts['killed']} killed ({counts['timeouts']} timeouts), {counts['survived']} "
          f"survived, {counts['invalid']} invalid; {elapsed:.0f}s, {elapsed / max(counts['tried'], 1):.1f}s per mutant "
          f"with {len(copies)} jobs (one test run: {base_s:.1f}s)")
    for m in survivors:
        print("  " + describe(m))
    git = lambda *a: subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True).stdout.strip()
    result = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git("rev-parse", args.rev or "HEAD"),
                  copied=args.rev or "working tree" + (" (uncommitted changes)" if git("status", "--porcelain") else ""),
                  targets=args.targets, tests=args.tests, timeout_s=args.timeout, jobs=len(copies), only=args.only,
                  retry=args.retry,
                  limit=args.limit, mutants=total, counts=counts, elapsed_s=round(elapsed, 1),
                  baseline_s=round(base_s, 1), survivors=[{k: m[k] for k in ("file", "line", "col", "function",
                                                                            "label", "source_line")} for m in survivors])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
