"""`saemerge validate | explain | merge | train-saes | distill | eval | push | export-saes | analyze | report | stitch
| links | features | circuit`: a thin layer over the Python API. Bad input exits with code 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import UserError
from .recipe import load_recipe


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.seed=3 --set models.0.layer=2 (repeatable)")


def _allow_pickle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickled weights (pytorch_model.bin, *.pt, adapter_model.bin); loading a pickle "
                        "can run code: only for files you trust")


def _output_args(p: argparse.ArgumentParser, output_help: str, metavar: str | None = None,
                 resume_help: str | None = None) -> None:
    """--output, --overwrite, --resume (for commands that checkpoint) and --quiet, as every writing command has them."""
    p.add_argument("--output", metavar=metavar, help=output_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder once the new one is complete")
    if resume_help:
        p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_validate(args) -> int:
    from .checks import output_bytes, size_text, validate
    from .retokenize import same_tokenizer
    from .sources import load_tokenizer

    recipe = load_recipe(args.recipe, args.overrides)
    paths = validate(recipe, overwrite=True, allow_pickle=args.allow_pickle)
    print(f"{args.recipe}: ok")
    target = recipe.merge.target
    for spec in recipe.models:
        own = not same_tokenizer(load_tokenizer(recipe.source(target)), load_tokenizer(spec))
        print(f"  {spec.name}: {spec.model}  layer {spec.layer!r} -> {', '.join(paths[spec.name])}"
              + (f"  (own tokenizer: reads {target}'s text in its tokens)" if own else ""))
    print(f"  will write about {size_text(output_bytes(recipe, paths))} to {recipe.output}")
    return 0


def cmd_explain(args) -> int:
    from .recipe_reference import recipe_reference

    print(recipe_reference(markdown=args.markdown, fields=args.fields), end="")
    return 0


def cmd_merge(args) -> int:
    from .pipeline import merge

    recipe = load_recipe(args.recipe, args.overrides)
    start = time.perf_counter()
    output = merge(recipe, output=args.output, overwrite=args.overwrite, progress=not args.quiet,
                   evaluate_after=not args.no_eval, resume=args.resume, allow_pickle=args.allow_pickle)
    if output is None:  # a helper process of a multi-process run: the first one reports
        return 0
    print((output / "report.md").read_text())
    print(f"merged model written to {output} in {time.perf_counter() - start:.0f}s")
    return 0


def cmd_train_saes(args) -> int:
    from .dictionaries import train_dictionaries
    from .recipe import SAERecipe

    recipe = load_recipe(args.recipe, args.overrides, schema=SAERecipe)
    start = time.perf_counter()
    output = train_dictionaries(recipe, output=args.output, overwrite=args.overwrite, resume=args.resume,
                                progress=not args.quiet, allow_pickle=args.allow_pickle)
    if output is not None:
        print((output / "README.md").read_text())
        print(f"dictionaries written to {output} in {time.perf_counter() - start:.0f}s")
    return 0


def cmd_distill(args) -> int:
    from .distill import default_output, distill
    from .evaluate import load_merged
    from .recipe import DistillSpec, parse_recipe

    import yaml

    folder = Path(args.model)
    if not (folder / "recipe.yaml").is_file():
        raise UserError(f"{folder}: no recipe.yaml; expected a folder written by `saemerge merge`")
    raw = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe = parse_recipe(raw, str(folder / "recipe.yaml"), args.overrides)
    if recipe.distill is None:
        recipe.distill = DistillSpec()
    output = Path(args.output) if args.output else default_output(recipe, folder)
    start = time.perf_counter()
    teacher, tokenizer = load_merged(folder, device=args.device, allow_pickle=args.allow_pickle, dtype=args.dtype)
    output = distill(teacher, recipe, tokenizer, output, overwrite=args.overwrite, resume=args.resume,
                     progress=not args.quiet, evaluate_after=not args.no_eval, allow_pickle=args.allow_pickle,
                     teacher_name=folder.name)
    held = json.loads((output / "distill.json").read_text())["held_out"]
    print(f"held-out next-token loss: teacher {held['teacher_loss']:.4f}, student {held['student_loss_before']:.4f} "
          f"-> {held['student_loss_after']:.4f}")
    if (output / "eval_results.json").is_file():
        from .evaluate import results_table

        print(results_table(json.loads((output / "eval_results.json").read_text())["results"]))
    print(f"student written to {output} in {time.perf_counter() - start:.0f}s")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate, load_merged, results_table

    model, tokenizer = load_merged(args.model, device=args.device, allow_pickle=args.allow_pickle, dtype=args.dtype)
    tasks = [t for t in args.tasks.split(",") if t]
    output = Path(args.output) if args.output else Path(args.model) / "eval_results.json"
    results = evaluate(model, tokenizer, tasks, args.include_path, args.limit, args.batch_size, output=output,
                       max_length=args.max_length)
    print(results_table(results))
    print(f"results written to {output}")
    return 0


def cmd_push(args) -> int:
    from .hub import push

    url = push(args.folder, args.repo, private=args.private, token=args.token, commit_message=args.message)
    print(f"pushed {args.folder} to {url}")
    return 0


def cmd_export_saes(args) -> int:
    import yaml

    from .interchange import FORMATS, export_sae, import_sae

    if args.format not in FORMATS:
        raise UserError(f"--format: '{args.format}' is not a format; expected one of {', '.join(FORMATS)}")
    model_dir = Path(args.model_dir)
    folders = sorted(cfg.parent for cfg in model_dir.glob("saes/*/*/cfg.json"))
    if not folders:
        raise UserError(f"{model_dir}: not a merged model folder; expected saes/<source>/<module path>/ "
                        "as written by `saemerge merge`")
    recipe = yaml.safe_load((model_dir / "recipe.yaml").read_text()) if (model_dir / "recipe.yaml").is_file() else {}
    models = {m["name"]: m["model"] for m in recipe.get("models", [])}
    for folder in folders:
        source, hook = folder.parent.name, folder.name
        try:
            written = export_sae(import_sae(folder), Path(args.out_dir) / source / hook, args.format, hook_name=hook,
                                 model_name=models.get(source), context_size=recipe.get("data", {}).get("seq_len"))
        except ValueError as e:
            raise UserError(f"{folder}: {e}") from None
        print(f"{source} {hook} -> {written}")
    return 0


def cmd_analyze(args) -> int:
    from .analyze import analyze, summary

    start = time.perf_counter()
    report = analyze(args.a, args.b, output=args.output, aligned=True if args.aligned else None,
                     max_match=args.max_match, overwrite=args.overwrite, activations=args.activations,
                     data=args.data, tokens=args.tokens, model_a=args.model_a, model_b=args.model_b,
                     layer_a=args.layer_a, layer_b=args.layer_b, seq_len=args.seq_len, progress=not args.quiet)
    print(summary(report), end="")
    if args.output:
        print(f"analysis written to {args.output} in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_report(args) -> int:
    from .browser import build_report

    start = time.perf_counter()
    site = build_report(args.dir, output=args.output, analysis=args.analysis, tokens=args.tokens,
                        latents=args.latents, data=args.data, overwrite=args.overwrite, progress=not args.quiet,
                        allow_pickle=args.allow_pickle)
    print(f"feature browser written to {site / 'index.html'} in {time.perf_counter() - start:.1f}s")
    return 0


def _block_list(text: str | None, arg: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{arg}: '{text}' is not a list of block indices; expected e.g. 0,1,2") from None


def cmd_stitch(args) -> int:
    from .stitching import stitch_scan, summary

    report = stitch_scan(args.model_a, args.model_b, _block_list(args.layers_a, "--layers-a"),
                         _block_list(args.layers_b, "--layers-b"), args.data, steps=args.steps, lr=args.lr,
                         batch_rows=args.batch_rows, controls=not args.no_controls, seed=args.seed,
                         train_tokens=args.tokens, heldout_tokens=args.heldout_tokens, seq_len=args.seq_len,
                         device=args.device, dtype=args.dtype, output=args.output, overwrite=args.overwrite,
                         progress=not args.quiet)
    print(summary(report), end="")
    print(f"{report['seconds']:.0f}s; written to {args.output}")
    return 0


def cmd_links(args) -> int:
    from .feature_links import feature_links, summary

    output = args.output or Path(args.dir) / f"links-{args.upstream}-{args.downstream}"
    report = feature_links(args.dir, args.upstream, args.downstream, output=output, data=args.data,
                           tokens=args.tokens, upstream_features=args.features, downstream_features=args.features,
                           ablation=args.ablation, top_edges=args.top_edges, source=args.source,
                           overwrite=args.overwrite, progress=not args.quiet)
    print(summary(report, edges=10), end="")
    print(f"written to {output}")
    return 0


def cmd_features(args) -> int:
    from . import feature_clusters, feature_evolution, feature_splitting, feature_subsets
    from .feature_sample import load

    if args.output is None and args.mode in ("evolution", "clusters"):  # beside the dictionaries: the browser shows it
        args.output = Path(args.dir) / (f"features-{args.mode}" + (f"-{args.site}" if args.mode == "clusters" else ""))
    common = {"tokens": args.tokens, "data": args.data, "output": args.output, "overwrite": args.overwrite,
              "progress": not args.quiet}
    if args.mode == "evolution":
        module = feature_evolution
        control = load(args.control, "--control") if args.control else None
        report = module.feature_evolution(load(args.dir, "DIR"), args.threshold, args.attention, args.mlp, control,
                                          **common)
    elif args.mode == "clusters":
        module = feature_clusters
        report = module.feature_clusters(load(args.dir, "DIR"), args.site, args.clusters, top=args.top,
                                         members=args.members, **common)
    elif args.mode == "split":
        module = feature_splitting
        report = module.feature_splitting(args.folders, args.threshold, **common)
    else:
        module = feature_subsets
        report = module.feature_subsets(args.subset, args.full, args.control, args.threshold, **common)
    print(module.summary(report), end="")
    if args.output:
        print(f"written to {args.output}")
    return 0


def cmd_circuit(args) -> int:
    from .circuits import find_circuit, summary

    if args.output is None:  # beside the dictionaries: the browser shows it
        args.output = Path(args.dir) / f"circuit-{Path(args.behaviour).stem}"
    report = find_circuit(args.dir, args.behaviour, data=args.data, prompts=args.prompts, target=args.target,
                          methods=args.methods, tau=args.tau, max_seconds=args.max_seconds, refine=args.refine,
                          ig_steps=args.ig_steps, window=args.window, seed=args.seed, output=args.output,
                          overwrite=args.overwrite, progress=not args.quiet)
    print(summary(report), end="")
    print(f"{report['seconds']:.0f}s; written to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saemerge", description="Merge language models through aligned sparse autoencoders.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe and its sources without training",
                       description="Check a recipe: schema, sources, layers, tokenizers, data, disk space. "
                                   "Writes nothing. `saemerge explain` lists every recipe field with its default.")
    _recipe_args(p)
    _allow_pickle_arg(p)
    p.set_defaults(run=cmd_validate)

    p = sub.add_parser("explain", help="print every recipe field with its default and meaning",
                       description="Print the recipe reference, generated from the schema: every field, or only "
                                   "the named fields and sections (e.g. `saemerge explain latent train.lr`).")
    p.add_argument("fields", nargs="*", metavar="FIELD",
                   help="a field or section, e.g. train.lr, models.layer, merge (default: all)")
    p.add_argument("--markdown", action="store_true", help="print the markdown table of the README")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("merge", help="run a recipe: harvest, train the SAEs, build, save, evaluate, report",
                       description="Run a recipe end to end and write the merged model folder.")
    _recipe_args(p)
    _output_args(p, "output folder (default: the recipe's `output`)",
                 resume_help="continue an interrupted run from its checkpoint (same recipe; train.lr may change)")
    p.add_argument("--no-eval", action="store_true", help="skip the recipe's lm-eval tasks")
    _allow_pickle_arg(p)
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("train-saes", help="train SAEs at many sites of a model (no merge): dictionaries to analyse",
                       description="Train an SAE at every site the recipe lists (`models.0.layer`: block indices "
                                   "or module paths such as transformer.h.1.attn, model.layers.2.mlp), the model "
                                   "run once per batch for all of them. A recipe with one source, or a merge "
                                   "recipe (its merge, eval, save and distill sections are ignored; its sources' "
                                   "SAEs share a latent space per site). Writes saes/, metrics.json, "
                                   "training_log.jsonl, training_curves.png and a README table; `saemerge "
                                   "export-saes` converts them, `links`, `circuit` and `features` analyse them.")
    _recipe_args(p)
    _output_args(p, "output folder (default: the recipe's `output`)",
                 resume_help="continue an interrupted run from its checkpoint (same recipe; train.lr may change)")
    _allow_pickle_arg(p)
    p.set_defaults(run=cmd_train_saes)

    p = sub.add_parser("distill", help="distil a merged model into one plain model that runs at one model's cost",
                       description="Train a student (by default the merge's target, see `saemerge explain distill`) "
                                   "on the merged model's next-token distribution over the recipe's data: KL at a "
                                   "temperature plus the plain next-token loss, and optionally a feature term "
                                   "through the aligned SAEs. Writes a plain Hugging Face folder (loads without "
                                   "saemerge) with distill.json, distill_log.jsonl, distill_curves.png and a model "
                                   "card, then runs the recipe's eval tasks on it. Settings come from the "
                                   "folder's recipe.yaml `distill:` section (defaults if it has none) and --set.")
    p.add_argument("model", metavar="MERGED_DIR", help="folder written by `saemerge merge` (the teacher)")
    _output_args(p, "folder for the student (default: distill.output, else MERGED_DIR-distilled)",
                 resume_help="continue an interrupted distillation from its checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set distill.tokens=200000 --set distill.student=prose "
                        "(repeatable)")
    p.add_argument("--no-eval", action="store_true", help="skip the recipe's lm-eval tasks")
    p.add_argument("--device", default="cpu", help="device of teacher and student (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="load the teacher in this dtype (default: auto, as saved); the student trains in float32")
    _allow_pickle_arg(p)
    p.set_defaults(run=cmd_distill)

    p = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a merged model folder",
                       description="Evaluate a saved model folder with lm-evaluation-harness.")
    p.add_argument("model", help="folder written by `saemerge merge` (or any causal LM folder)")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include-path", help="folder of local task YAMLs (e.g. eval/tasks)")
    p.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="context lm-eval scores with (default: the model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="load the model in this dtype (default: auto, as saved)")
    p.add_argument("--output", help="JSON file for the results (default: MODEL/eval_results.json)")
    _allow_pickle_arg(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("push", help="upload a merged model folder to the Hugging Face Hub, with a model card",
                       description="Create the Hub repo if needed and upload the folder. README.md (the model card) "
                                   "is written first if missing or not edited since the merge wrote it. The token "
                                   "is --token, else the HF_TOKEN variable, else the one saved by `hf auth login`.")
    p.add_argument("folder", help="folder written by `saemerge merge`")
    p.add_argument("repo", help="Hub repo id, e.g. your-name/prose-x-code")
    p.add_argument("--private", action="store_true", help="make a new repo private (an existing one is left as it is)")
    p.add_argument("--token", help="Hugging Face token with write access (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--message", default="Upload model merged with saemerge", help="commit message")
    p.set_defaults(run=cmd_push)

    p = sub.add_parser("export-saes", help="write the SAEs of a merged model folder in SAELens or sparsify format",
                       description="Write every SAE of a merged model folder to OUT_DIR/<source>/<module path>/ in "
                                   "SAELens or sparsify format, the module path as hook name; the input scale is "
                                   "folded into the weights. sparsify holds TopK SAEs only.")
    p.add_argument("model_dir", help="folder written by `saemerge merge`")
    p.add_argument("out_dir", help="folder to write into (created if missing)")
    p.add_argument("--format", default="saelens", metavar="{saelens,sparsify}", help="file format (default: saelens)")
    p.set_defaults(run=cmd_export_saes)

    p = sub.add_parser("analyze", help="compare two SAE dictionaries by their decoder directions (and activations)",
                       description="Compare SAE dictionaries by their decoder weights: mean max cosine both ways "
                                   "(MMCS), the one-to-one (Hungarian) matching and its cosines, and for aligned "
                                   "SAEs latent i vs latent i and the relative decoder norm |d_A| / (|d_A| + "
                                   "|d_B|). A alone: a merged model folder, whose sources' SAEs are compared at "
                                   "each site, aligned (they share one latent space). A and B: two SAE folders in "
                                   "saemerge, SAELens or sparsify format of the same width (a merged folder's are "
                                   "in saes/<source>/<module path>/). With --activations or --data, also the "
                                   "activation measures (the models read the same tokens). Prints one line per "
                                   "measure; --output also writes analysis.json, analysis.md and one PNG per "
                                   "measure.")
    p.add_argument("a", metavar="A", help="a merged model folder, or an SAE folder")
    p.add_argument("b", metavar="B", nargs="?", help="an SAE folder to compare with the SAE folder A")
    p.add_argument("--output", metavar="DIR",
                   help="write analysis.json, analysis.md and the plots into this new folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    p.add_argument("--aligned", action="store_true",
                   help="latent i of A is latent i of B (e.g. SAEs exported from one merged folder): also compare "
                        "them latent by latent; automatic for the SAEs of one site of a merged folder")
    p.add_argument("--max-match", type=int, default=4096, metavar="N",
                   help="exact Hungarian matching up to N latents (O(N^3)); above, each latent is matched among "
                        "its 8 nearest partners (default: 4096)")
    g = p.add_argument_group("activation measures", "firing rates, co-firing, activation matching, "
                             "cross-reconstruction (explained variance, CE recovered) and a learned latent map, on "
                             "the same tokens through both models")
    g.add_argument("--activations", action="store_true",
                   help="also the activation measures, on the merged folder's recipe data (implied by --data)")
    g.add_argument("--data", metavar="FILE", help='a .jsonl, .jsonl.gz or .txt file (json rows with a "text" field) '
                                                  "instead of the recipe's data")
    g.add_argument("--tokens", type=int, default=32768, metavar="N", help="tokens to measure on (default: 32768)")
    g.add_argument("--seq-len", type=int, metavar="N", help="tokens per sequence (default: the recipe's, else 128)")
    for side in ("a", "b"):
        g.add_argument(f"--model-{side}", metavar="MODEL",
                       help=f"the model SAE {side.upper()} reads (a local folder), for two SAE folders (default: the "
                            "recipe of the merged folder they are in, or a SAELens cfg.json's model_name)")
        g.add_argument(f"--layer-{side}", metavar="L",
                       help=f"block index or module path SAE {side.upper()} reads (default: as for --model-{side}, "
                            "or a SAELens hook_name)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_analyze)

    p = sub.add_parser("report", help="write a static HTML feature browser of a merged (or analysis) folder",
                       description="Write an offline HTML site (inline CSS, no scripts): index.html with the recipe, "
                                   "SAE metrics, training curves, evaluation table, the analysis plots and a table "
                                   "of latents; latents/<i>.html per latent with its decoder norm and firing rate "
                                   "in each source, co-firing, top-activating snippets and the tokens it promotes "
                                   "through each source's head. Runs the sources on --tokens tokens of the "
                                   "recipe's data (or --data). DIR may also be an analysis folder alone.")
    p.add_argument("dir", metavar="DIR", help="a merged model folder, or an analysis folder (analysis.json)")
    p.add_argument("--output", metavar="SITE_DIR", help="new folder for the site (default: DIR/browser)")
    p.add_argument("--analysis", metavar="ANALYSIS_DIR",
                   help="a `saemerge analyze --output` folder to show (default: one found inside DIR)")
    p.add_argument("--tokens", type=int, default=32768, metavar="N",
                   help="tokens to run the sources on (default: 32768)")
    p.add_argument("--latents", type=int, default=200, metavar="N",
                   help="latents with a page, per site (default: 200)")
    p.add_argument("--data", metavar="FILE",
                   help="a JSON lines file with a \"text\" field (default: the recipe's data)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _allow_pickle_arg(p)
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("stitch", help="stitch model A's residual stream into model B's (an affine map) and scan "
                                      "layer pairs for the stitching penalty",
                       description="For each pair of blocks (A's i, B's j): fit an affine map from A's residual "
                                   "stream after block i to B's after block j (least squares, then --steps of "
                                   "Adam on B's next-token loss, both models frozen), run B on from block j with "
                                   "the mapped residual, and report the stitching penalty: held-out CE of the "
                                   "stitched model minus B's own. Baselines: B with its residual replaced by its "
                                   "mean, and the same stitch from a re-initialised, untrained A. The models must "
                                   "share a tokenizer; widths may differ. --output writes stitch.json, stitch.md "
                                   "and stitch_heatmap.png into a new folder.")
    p.add_argument("model_a", metavar="MODEL_A", help="model folder whose residual stream is mapped")
    p.add_argument("model_b", metavar="MODEL_B", help="model folder that runs on from the stitched residual")
    p.add_argument("--data", required=True, metavar="FILE",
                   help='a .jsonl or .jsonl.gz file with a "text" field: the first rows train the maps, the '
                        "following ones are held out")
    p.add_argument("--layers-a", metavar="I,J,...", help="A's blocks (default: all)")
    p.add_argument("--layers-b", metavar="I,J,...", help="B's blocks (default: all)")
    p.add_argument("--tokens", type=int, default=50_000, metavar="N", help="train tokens (default: 50000)")
    p.add_argument("--heldout-tokens", type=int, default=20_000, metavar="N", help="held-out tokens (default: 20000)")
    p.add_argument("--steps", type=int, default=100, metavar="N",
                   help="Adam steps of CE training per pair and fit (0: least squares only; default: 100)")
    p.add_argument("--batch-rows", type=int, default=8, metavar="N", help="rows per training step (default: 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine decay to 10%% (default: 1e-3)")
    p.add_argument("--seq-len", type=int, metavar="N", help="tokens per row (default: the models' context, at most 1024)")
    p.add_argument("--seed", type=int, default=0, help="document order, training batches and the random A (default: 0)")
    p.add_argument("--no-controls", action="store_true", help="skip the mean-ablation floor and the random-A stitch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="load the models in this dtype (default: float32; the maps are float32)")
    _output_args(p, "write stitch.json, stitch.md and stitch_heatmap.png into this new folder", "DIR")
    p.set_defaults(run=cmd_stitch)

    p = sub.add_parser("links", help="causal links between the features of two sites of train-saes dictionaries",
                       description="For the most active features of an upstream site and of a later downstream "
                                   "site: the effect on each downstream feature of ablating each upstream one "
                                   "(zeroed or resampled from other tokens; one forward per upstream feature), "
                                   "gradient x activation attribution beside it (one backward per downstream "
                                   "feature) and their agreement (Spearman, Pearson, top-edge overlap, seconds). "
                                   "Cost grows with tokens x (2 x features): 64 x 64 features took 1 to 1.5 "
                                   "minutes per method on 4096 tokens of the zoo GPT-2, 2.5 to 3.5 on 2048 "
                                   "tokens of Gemma-3-270m (one CPU core). Writes links.json (every edge, snippets), links.md and "
                                   "links.png (the strongest edges).")
    p.add_argument("dir", metavar="DICT_DIR", help="a folder written by `saemerge train-saes`")
    p.add_argument("--upstream", required=True, metavar="SITE", help="site index (0: the first site) or module path")
    p.add_argument("--downstream", required=True, metavar="SITE", help="a later site: index or module path")
    p.add_argument("--data", metavar="FILE", help='a JSON lines file with a "text" field (default: the recipe\'s data)')
    p.add_argument("--tokens", type=int, default=4096, metavar="N", help="tokens to measure on (default: 4096)")
    p.add_argument("--features", type=int, default=64, metavar="N",
                   help="most active features taken at each site (default: 64)")
    p.add_argument("--ablation", default="zero", choices=["zero", "resample"],
                   help="zero the upstream feature, or give it its activation at a random other token (default: zero)")
    p.add_argument("--top-edges", type=int, default=30, metavar="N",
                   help="edges drawn and compared for the top-edge overlap (default: 30)")
    p.add_argument("--source", metavar="NAME", help="whose SAEs, in a folder of several sources (default: the first)")
    _output_args(p, "new folder for the results (default: DICT_DIR/links-UP-DOWN)", "DIR")
    p.set_defaults(run=cmd_links)

    p = sub.add_parser("features", help="follow, cluster and compare the features of train-saes dictionaries",
                       description="Analyses of the features of `saemerge train-saes` folders, by decoder cosine "
                                   "(and by activations on a token sample of the recipe's data or --data; latents "
                                   "that never fire there are left out). evolution: features matched from one "
                                   "residual site to the next, where each first appears, how long it lasts, "
                                   "whether attention or the MLP writes it. clusters: one site's features "
                                   "clustered by decoder cosine and by co-activation, with snippets. split: "
                                   "dictionaries of growing size, parent -> children trees. subset: dictionaries "
                                   "trained on a subset of the data against the full data's. Prints a markdown "
                                   "summary; --output writes JSON, markdown and PNG.")
    modes = p.add_subparsers(dest="mode", required=True)
    for name, text in (("evolution", "match features from one residual site to the next (DIR's own sites)"),
                       ("clusters", "cluster one site's features by decoder cosine and by co-activation"),
                       ("split", "match dictionaries of growing size: parent -> children trees"),
                       ("subset", "dictionaries trained on a data subset D' against those trained on D")):
        m = modes.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name == "evolution":
            m.add_argument("dir", metavar="DIR", help="a train-saes folder with two or more block outputs as sites")
            m.add_argument("--attention", action="append", metavar="PATH",
                           help="a site holding what a block's attention writes (repeatable; default: sites "
                                "inside a block named *attn*, *attention*)")
            m.add_argument("--mlp", action="append", metavar="PATH",
                           help="a site holding what a block's MLP writes (repeatable; default: *mlp*, "
                                "*feedforward*, *ffn*)")
            m.add_argument("--control", metavar="DIR",
                           help="the same sites trained with another train.seed: tells features carried from "
                                "site to site from the start all sites of one folder share")
        elif name == "clusters":
            m.add_argument("dir", metavar="DIR", help="a train-saes folder")
            m.add_argument("--site", default="-1", help="site index or module path (default: the last site)")
            m.add_argument("--clusters", type=int, metavar="N", help="clusters each way (default: live features / 16)")
            m.add_argument("--top", type=int, default=8, metavar="N", help="largest clusters listed (default: 8)")
            m.add_argument("--members", type=int, default=4, metavar="N",
                           help="members with snippets per listed cluster (default: 4)")
        elif name == "split":
            m.add_argument("folders", nargs="+", metavar="DIR",
                           help="two or more train-saes folders of one model and recipe sites, of different sizes")
        else:
            m.add_argument("subset", metavar="SUBSET", help="train-saes folder trained on the subset D'")
            m.add_argument("full", metavar="FULL", help="train-saes folder trained on D")
            m.add_argument("--control", metavar="DIR",
                           help="a folder trained on D with another train.seed: the noise floor")
        if name != "clusters":
            m.add_argument("--threshold", type=float, default=0.7,
                           help="decoder cosine at which two features are the same (default: 0.7)")
        m.add_argument("--tokens", type=int, default=16384, metavar="N",
                       help="tokens of the sample" + ("" if name in ("clusters", "subset") else
                                                      "; 0: decoder weights only, dead latents included")
                            + " (default: 16384)")
        m.add_argument("--data", metavar="FILE", help='a JSON lines file with a "text" field (default: the '
                                                      "recipe's data; held-out text for held-out numbers)")
        _output_args(m, "write JSON, markdown and PNG into this new folder" + (
            f" (default: DIR/features-{name}{'-SITE' if name == 'clusters' else ''})"
            if name in ("evolution", "clusters") else ""), "DIR")
        m.set_defaults(run=cmd_features)

    p = sub.add_parser("circuit", help="find a small circuit of features that keeps a behaviour (faithfulness "
                                       "against size, greedy attribution vs ACDC-style pruning)",
                       description="A behaviour is prompts with a (correct, incorrect) next token; its metric the "
                                   "mean logit difference at the last token. A circuit is a set of (site, latent) "
                                   "features; every other feature takes its mean code over the search prompts "
                                   "(SAE errors always kept). faithfulness = (m(C) - m(empty)) / (m(full) - "
                                   "m(empty)). Methods: attribution (integrated-gradient attribution toward the "
                                   "mean, the top features at growing sizes to the smallest circuit reaching "
                                   "--target, refined with the circuit in place), acdc (ACDC-style pruning of the "
                                   "active features, deepest site first, threshold --tau), components (the same "
                                   "pruning over attention heads and MLPs). Writes circuit.json, circuit.md and "
                                   "circuit.png with --output.")
    p.add_argument("dir", metavar="DICT_DIR", help="a `saemerge train-saes` folder")
    p.add_argument("--behaviour", required=True, metavar="brackets|FILE.jsonl",
                   help='brackets (closing ")" vs "]" in the code of --data), or a JSON lines file of '
                        '{"prompt", "correct", "incorrect"}, each continuation one token')
    p.add_argument("--data", metavar="FILE", help='.jsonl(.gz) code text ("text" field) for --behaviour brackets')
    p.add_argument("--prompts", type=int, default=128, metavar="N",
                   help="prompts in all, half searched on and half held out (default: 128)")
    p.add_argument("--window", type=int, default=32, metavar="N", help="tokens per brackets prompt (default: 32)")
    p.add_argument("--target", type=float, default=0.8, help="faithfulness the attribution circuit must reach "
                                                            "(default: 0.8)")
    p.add_argument("--methods", default="attribution,acdc,components",
                   help="comma-separated: attribution, acdc, components (default: all three)")
    p.add_argument("--tau", type=float, default=0.005,
                   help="ACDC-style threshold, a fraction of m(full) - m(empty) (default: 0.005)")
    p.add_argument("--max-seconds", type=float, metavar="S",
                   help="time budget of each ACDC-style search; then it stops and reports itself unfinished")
    p.add_argument("--ig-steps", type=int, default=4, metavar="N",
                   help="integrated-gradient steps of the first attribution (1: plain gradient; default: 4)")
    p.add_argument("--refine", type=int, default=3, metavar="N",
                   help="rounds of attribution recomputed with the circuit in place (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="prompt choice and search / held-out split (default: 0)")
    _output_args(p, "write circuit.json, circuit.md and circuit.png into this new folder "
                    "(default: DICT_DIR/circuit-BEHAVIOUR)", "DIR")
    p.set_defaults(run=cmd_circuit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        for line in e.lines:
            # Control characters from the input (a newline in a key, a terminal escape) shown escaped: one line each.
            line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # TrainingInterrupted says where its checkpoint is
        print(f"interrupted: {e}; continue with --resume" if str(e) else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
