"""The ``dermray`` command: parse, load config, call a stage. Errors print without a traceback.

The terminal shows dermray's own lines; other libraries' logs (Ray, Tune, TensorFlow, Optuna)
go to OUT/logs/dermray.log. -v shows everything; -q only errors and the final summary."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dermray.config import check_weights_files, load_all, read_yaml
from dermray.data.catalog import build_catalog, read_metadata, split_summary
from dermray.data.fetch import DATAVERSE, fetch
from dermray.data.synth import parse_size, write_synth_dataset
from dermray.errors import DermrayError
from dermray.installed import check_run, check_stages, extract_needs, require_all
from dermray.io import faults, storage
from dermray.io.lock import hold
from dermray.io.storage import describe_failure, is_store_failure, join, redact
from dermray.models.bundle import load_bundle
from dermray.models.policies import POLICY_SPECS, policy_names
from dermray.models.predict_io import LIST_SUFFIXES, Limits, expand_inputs, run_predict_local
from dermray.report.dashboard import write_dashboard
from dermray.report.explain import explain_files
from dermray.report.summary import run_summary
from dermray.stages import console
from dermray.stages.extract import run_extract
from dermray.stages.pipeline import run_pipeline, run_search_stage, run_split
from dermray.stages.predict import run_predict_ray
from dermray.stages.progress import (
    PredictProgress,
    break_status,
    mode_from_flags,
    set_mode,
    term_width,
    wrap,
)
from dermray.stages.raysession import hide_credentials_in_cmdline, joined_cluster

logger = logging.getLogger("dermray")


def _overrides(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    """CLI values for config keys; flags the user did not pass are None and are ignored."""
    return {k: getattr(args, k, None) for k in keys}


def _data_config(args: argparse.Namespace):
    return preflight(args)["data"]


def _extract_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = _overrides(args, ["manifest", "out", "image_size", "batch_size", "num_actors"])
    if args.backbone:
        overrides["backbones"] = tuple(args.backbone)
    if args.weights:
        weights = {}
        for item in args.weights:
            name, sep, value = item.partition("=")
            if not sep:
                raise DermrayError(f"--weights takes NAME=PATH|imagenet|none. Got {item!r}.")
            weights[name] = value
        overrides["weights"] = weights
    if args.no_augment:
        overrides["augment"] = False
    return overrides


def preflight(args: argparse.Namespace) -> dict[str, Any]:
    """Every section of the command's config, with its flags on top, validated before any stage
    runs (and before Ray starts); for the commands that build models, every weights file the
    config names is checked too. Returns the sections by name."""

    path = getattr(args, "config", None)
    if args.command == "data":
        data = _overrides(args, ["metadata", "out", "seed"])
        data["images"] = tuple(args.images) if getattr(args, "images", None) else None
        overrides: dict[str, dict[str, Any]] = {"data": data}
    elif args.command == "extract":
        overrides = {"extract": _extract_overrides(args)}
    elif args.command == "search":
        overrides = {"search": {"out": args.out, "num_samples": args.num_samples,
                                "algorithm": args.algorithm}}
    else:  # run: the data stage always runs; the others where the file has their section
        overrides = {name: {"out": args.out} for name in ("data", *read_yaml(path))}
    configs = load_all(path, overrides)
    if args.command != "data":
        check_weights_files(configs)
    return configs


def _print_catalog(summary: dict[str, Any]) -> None:
    print(f"rows: {summary['rows']}")
    # rows in = rows clean + rows reported (a reported row is kept; extract quarantines a bad file)
    print(f"rows clean: {summary['rows_clean']}, rows with a warning: {summary['rows_reported']}")
    if summary["problem_counts"]:
        print("warnings by kind: " + ", ".join(f"{k} {n}" for k, n in
                                               summary["problem_counts"].items()))
    print(f"lesions: {summary['lesions']}")
    print("class counts: " + ", ".join(f"{c} {n}" for c, n in summary["class_counts"].items()))
    print("image folders: " + ", ".join(summary["image_dirs"]))
    for w in summary["warnings"]:
        print(f"warning: {w}")


def cmd_validate(args: argparse.Namespace) -> int:

    cfg = _data_config(args)
    if not cfg.metadata:  # a config that makes synthetic data (data.synth_n) has no catalog yet
        raise DermrayError(f"data.metadata is not set (the config makes {cfg.synth_n} synthetic "
                           "images when run); pass --metadata HAM10000_metadata.csv to validate "
                           "a catalog, or `dermray data synth --dest DIR` to make one.")
    catalog = build_catalog(cfg.metadata, cfg.images)
    _print_catalog(catalog.summary())
    print("catalog is valid")
    return 0


def cmd_split(args: argparse.Namespace) -> int:

    cfg = _data_config(args)
    console.check_out(cfg.out)  # OUT made (or refused with a message) before anything runs
    with hold(cfg.out, "dermray data split"):
        console.log_to(cfg.out)
        path, manifest = run_split(cfg, fresh=args.fresh)

    print(split_summary(manifest).to_string())
    print(f"wrote {path}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:

    result = fetch(args.dest, base_url=args.base_url or DATAVERSE, keep_zips=args.keep_zips)
    print(json.dumps(result, indent=2))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:

    size = parse_size(args.size)
    path = write_synth_dataset(args.dest, n=args.n, seed=args.seed, size=size)
    print(f"wrote {args.n} synthetic images and {path}")
    return 0


def _before_ray(args: argparse.Namespace, out: str,
                check_packages: Callable[[], None]) -> None:
    """Before a stage starts Ray: the progress mode from --quiet / -v, the packages it needs (a
    missing one is a message with the install command, not a traceback from an actor minutes
    later), and OUT: made and writable (a message otherwise). Once OUT's lock is held, its log
    file takes the other libraries' logs (``console.log_to``)."""

    set_mode(mode_from_flags(args.quiet, args.verbose))
    check_packages()
    console.check_out(out)


def _print_result(result: dict[str, Any]) -> None:
    """A search's closing summary (winner, figures per policy, paths, next commands); then,
    where stdout is not a terminal (a script, a job's log), the result as JSON too."""
    if console.current_log_file():
        result["logs"] = console.current_log_file()
    if "winner" in result:
        lines = run_summary(result)
        if sys.stdout.isatty():  # each line within the terminal's width
            lines = [wrap(line, term_width(sys.stdout)) for line in lines]
        print("\n".join(lines))
    if not (sys.stdout.isatty() and "winner" in result):
        print(json.dumps(result, indent=2, default=str))


def cmd_extract(args: argparse.Namespace) -> int:

    cfg = preflight(args)["extract"]
    _before_ray(args, cfg.out, lambda: require_all(extract_needs()))
    with hold(cfg.out, "dermray extract"):
        console.log_to(cfg.out)
        record = run_extract(cfg, fresh=args.fresh)
    print(json.dumps({k: record[k] for k in ("rows", "quarantined", "wall_s", "images_per_s",
                                             "embeddings")}, indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:

    preflight(args)
    _before_ray(args, args.out, lambda: check_run(args.config, args.out))
    with hold(args.out, "dermray run"):
        console.log_to(args.out)
        result = run_pipeline(args.config, args.out, fresh=args.fresh)
    _print_result(result)
    return 0


def cmd_search(args: argparse.Namespace) -> int:

    overrides = {"num_samples": args.num_samples, "algorithm": args.algorithm}

    preflight(args)
    _before_ray(args, args.out, lambda: check_stages(args.config, ["search"], args.out,
                                                     overrides))
    with hold(args.out, "dermray search"):
        console.log_to(args.out)
        result = run_search_stage(args.config, args.out,
                                  args.manifest or join(args.out, "manifest.parquet"), overrides,
                                  fresh=args.fresh)
    _print_result(result)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:

    if args.out:  # an unwritable --out is a message now, not after predicting everything
        storage.check_writable(args.out)
    limits = Limits(max_bytes=args.max_bytes, max_pixels=args.max_pixels,
                    batch_size=args.batch_size)
    metadata = None
    if args.metadata:

        metadata = read_metadata(args.metadata).drop_duplicates("image_id").set_index("image_id")
    set_mode(mode_from_flags(args.quiet, args.verbose))
    # TensorFlow's C++ lines (absl's, past TF_CPP_MIN_LOG_LEVEL) and Ray's: not on the terminal
    console.log_to(None, "predict")
    # progress on a terminal when the rows go to a file (printed rows are their own progress)
    shown = PredictProgress() if args.out and not args.quiet else None
    try:
        if _predict_on_ray(args):
            return _predict_ray(args, limits, metadata, shown)
        result = run_predict_local(args.model, args.inputs, args.out, args.policy, metadata,
                                   limits, weights_dirs=args.weights_dir or (), fmt=args.format,
                                   on_problem=_warn, on_progress=shown)
    finally:
        if shown is not None:
            shown.close()
    if args.out:
        print(f"wrote {result['rows']} predictions to {args.out} ({result['skipped']} file(s) "
              "skipped)")
    return 0 if result["rows"] else 1


def _warn(message: str) -> None:
    break_status()  # a status line shown: the warning starts a line of its own
    print(f"warning: {message}", file=sys.stderr)





def _predict_on_ray(args: argparse.Namespace) -> bool:
    """--ray / --no-ray as asked; by default Ray Data on a joined cluster (RAY_ADDRESS), or when
    an input is an s3:// prefix or a list file (usually many files: Ray decodes in parallel).
    Both paths read every kind of input and give the same rows."""
    if args.ray is not None:
        return args.ray

    return joined_cluster() or any("://" in i or i.lower().endswith(LIST_SUFFIXES)
                                   for i in args.inputs)


def _predict_ray(args: argparse.Namespace, limits: Any, metadata: Any,
                 shown: PredictProgress | None = None) -> int:

    # the actors embed with TensorFlow: a missing one is a message here, not an actor's traceback
    require_all([("tensorflow", "`dermray predict --ray` embeds images with Keras on TensorFlow")])
    result = run_predict_ray(args.model, args.inputs, args.out, args.policy, metadata, limits,
                             weights_dirs=args.weights_dir or (), fmt=args.format,
                             num_actors=args.num_actors or 0,
                             on_problem=_warn, on_progress=shown)
    if args.out:
        print(f"wrote {result['rows']} predictions to {args.out} ({result['skipped']} file(s) "
              f"skipped; Ray Data, {result['images_per_s']} images/s)")
    return 0 if result["rows"] else 1


def cmd_explain(args: argparse.Namespace) -> int:

    console.log_to(args.out)
    bundle = load_bundle(args.model, weights_dirs=args.weights_dir or ())
    files = expand_inputs(args.images)
    if not files:
        raise DermrayError(f"No images found in {', '.join(args.images)}.")
    records, problems = explain_files(bundle, files, args.out, method=args.method,
                                      policy=args.policy)
    for problem in problems:
        _warn(problem)
    for r in records:
        print(f"{r['png']}: {r['dx']} p={r['probability']:.3f} ({r['method']})")
    return 0 if records else 1


def cmd_report(args: argparse.Namespace) -> int:

    print(f"wrote {write_dashboard(args.out)}")
    return 0


VERBOSE_HELP = ("everything on the terminal: other libraries' logs (Ray, Tune, TensorFlow, "
                "Optuna; without -v they go to OUT/logs/dermray.log), dermray's debug lines, "
                "and every progress line (each trial started), also when stdout is not a "
                "terminal (without it a log gets a summary every 30 s)")


def verbose_flag(p: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup) -> None:
    """-v, --verbose: one meaning everywhere, before or after the command (the command's own
    copy defaults to 'not given', so that ``dermray -v run`` stays verbose)."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help=VERBOSE_HELP)


def progress_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true",
                       help="no progress lines (errors and the final summary only)")
    verbose_flag(group)


def fresh_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--fresh", action="store_true",
                   help=f"redo {what} in OUT when its old output was made with other settings or "
                   "inputs (it is deleted); without it such a rerun is refused, never mixed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dermray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=version_text(),
                        help="the dermray version (with Ray's and Python's) and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="HAM10000 catalog: fetch, synth, validate, split")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    def catalog_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config; its 'data' section")
        p.add_argument("--metadata", help="HAM10000_metadata.csv (local path or s3:// URI)")
        p.add_argument("--images", action="append",
                       help="image folder (repeatable); default: beside the metadata")

    p = data_sub.add_parser("validate", help="check the metadata and the image files")
    catalog_flags(p)
    verbose_flag(p)
    p.set_defaults(func=cmd_validate)

    p = data_sub.add_parser("split", help="lesion-grouped stratified split -> OUT/manifest.parquet")
    catalog_flags(p)
    p.add_argument("--out", help="output folder")
    p.add_argument("--seed", type=int, help="seed of the lesion-grouped split (data.seed)")
    fresh_flag(p, "the split")
    verbose_flag(p)
    p.set_defaults(func=cmd_split)

    p = data_sub.add_parser("fetch", help="download HAM10000 from Harvard Dataverse")
    p.add_argument("--dest", required=True, help="folder for the metadata CSV and the images")
    p.add_argument("--base-url", help="Dataverse server (default: dataverse.harvard.edu)")
    p.add_argument("--keep-zips", action="store_true",
                   help="keep the downloaded zip files after unpacking them")
    verbose_flag(p)
    p.set_defaults(func=cmd_fetch)

    p = data_sub.add_parser("synth", help="write a small synthetic dataset in the HAM10000 layout")
    p.add_argument("--dest", required=True, help="folder for the metadata CSV and the images")
    p.add_argument("--n", type=int, default=280, help="how many images (default 280)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and labels")
    p.add_argument("--size", default="200x150", help="WIDTHxHEIGHT of the JPEGs")
    verbose_flag(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("extract", help="frozen-backbone embeddings of the manifest -> Parquet")
    p.add_argument("--config", help="YAML config; its 'extract' section")
    p.add_argument("--manifest", help="the split to embed (default: OUT/manifest.parquet)")
    p.add_argument("--out", help="output folder (or s3:// URI) for embeddings/")
    p.add_argument("--backbone", action="append", help="vgg19 | resnet50 (repeatable)")
    p.add_argument("--weights", action="append", help="NAME=PATH|imagenet|none (repeatable)")
    p.add_argument("--image-size", dest="image_size", type=int,
                   help="side in pixels of the backbones' input (extract.image_size)")
    p.add_argument("--batch-size", dest="batch_size", type=int,
                   help="views per batch of the embedding actors (extract.batch_size)")
    p.add_argument("--num-actors", dest="num_actors", type=int,
                   help="embedding actors (default: one per GPU, else one per node)")
    p.add_argument("--no-augment", dest="no_augment", action="store_true",
                   help="embed the original images only, no class-balancing augmented views")
    fresh_flag(p, "the extraction")
    progress_flags(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("search", help="Ray Tune over the head families on OUT's embeddings")
    p.add_argument("--config", help="YAML config; its 'search' section")
    p.add_argument("--out", required=True, help="the output folder holding embeddings/")
    p.add_argument("--manifest", help="default: OUT/manifest.parquet")
    p.add_argument("--num-samples", dest="num_samples", type=int,
                   help="trials to run (search.num_samples)")
    p.add_argument("--algorithm", choices=["tpe", "random"],
                   help="Optuna TPE or random sampling (search.algorithm)")
    fresh_flag(p, "the search")
    progress_flags(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("predict", help="classify image files with an exported model bundle")
    p.add_argument("--model", required=True,
                   help="OUT/model of a `dermray run` (a folder or an s3:// URI)")
    p.add_argument("--policy", default="accuracy", choices=policy_names(),
                   help="the operating point chosen on validation: " + "; ".join(
                       f"{name}: {spec.summary}" for name, spec in POLICY_SPECS.items()))
    p.add_argument("--weights-dir", action="append", metavar="DIR",
                   help="a folder holding the backbone weights files (found by their sha256; "
                   "repeatable; also $DERMRAY_WEIGHTS_DIR and the Keras cache)")
    p.add_argument("--out", help="write a CSV here instead of printing it (one row per image, "
                   "with its path)")
    p.add_argument("--metadata", help="HAM10000-style CSV with age, sex, localization per "
                   "image_id, for models trained with patient metadata")
    p.add_argument("--max-bytes", dest="max_bytes", type=int, default=Limits.max_bytes,
                   help="skip (with a warning) files larger than this (default 50 MB)")
    p.add_argument("--max-pixels", dest="max_pixels", type=int, default=Limits.max_pixels,
                   help="skip images with more pixels than this, read from the header "
                   "(default 40 million)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=Limits.batch_size,
                   help="images decoded and predicted at a time: memory stays bounded")
    p.add_argument("--ray", action=argparse.BooleanOptionalAction, default=None,
                   help="run as a Ray Data job: decode tasks and predictor actors (a GPU each "
                   "where the cluster has GPUs), rows streamed to --out; default: on a joined "
                   "cluster (RAY_ADDRESS) or for s3:// and list-file inputs")
    p.add_argument("--format", choices=["csv", "parquet"],
                   help="output format (default: from the --out suffix, else csv)")
    p.add_argument("--num-actors", dest="num_actors", type=int,
                   help="predictor actors with --ray (default: one per GPU, else one per node)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_DIR_LIST_OR_S3",
                   help="image files, folders, list files (.txt: one path or URI a line) or "
                   "s3:// prefixes")
    progress_flags(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="a PNG per image: the decision and a heat map of where "
                       "the evidence is (Grad-CAM, or occlusion for trees)")
    p.add_argument("--model", required=True, help="OUT/model of a `dermray run`")
    p.add_argument("--out", required=True, help="folder for <image>.png and explanations.json")
    p.add_argument("--method", default="auto", choices=["auto", "gradcam", "occlusion"],
                   help="auto: Grad-CAM for differentiable heads (logistic, MLP, fine-tuned), "
                   "occlusion sensitivity for the others (XGBoost)")
    p.add_argument("--policy", default="accuracy", choices=policy_names(),
                   help="the operating point whose decision is explained (as in predict)")
    p.add_argument("--weights-dir", action="append", metavar="DIR",
                   help="a folder holding the backbone weights files (as in predict)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files or folders of images")
    verbose_flag(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("report", help="OUT/report.html: the Tune results dashboard (offline)")
    p.add_argument("out", metavar="OUT", help="the output folder of a `dermray run`")
    verbose_flag(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("run", help="the whole pipeline from a config file")
    p.add_argument("--config", required=True,
                   help="YAML config: a section per stage (data, extract, search); each stage "
                   "in it runs")
    p.add_argument("--out", required=True,
                   help="output folder (or s3:// URI) of every stage; rerunning resumes")
    fresh_flag(p, "every stage")
    progress_flags(p)
    p.set_defaults(func=cmd_run)
    return parser


def version_text() -> str:
    """``dermray 0.1.0 (Ray 2.60.0, Python 3.11.9)``: the versions read from the installed
    distributions, without importing them."""
    def installed(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    python = ".".join(str(n) for n in sys.version_info[:3])
    return f"dermray {installed('dermray')} (Ray {installed('ray')}, Python {python})"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = bool(getattr(args, "verbose", False))
    with console.session(verbose=args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    faults.warn_if_armed()  # a DERMRAY_FAULT left in the environment is never silent
    try:
        for key, value in vars(args).items():  # s3://KEY:SECRET@...: read once, then gone
            setattr(args, key, storage.strip_credentials(value))
        hide_credentials_in_cmdline()  # from `ps`, and from what Ray records as the entrypoint
        return args.func(args)
    except DermrayError as exc:
        break_status()
        print(f"error: {redact(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # S3 unreachable or refusing; a path that cannot be read or written
        break_status()
        if is_store_failure(exc):
            print(f"error: {describe_failure(None, exc)}", file=sys.stderr)
            return 2
        if args.verbose:  # -v: the traceback, for a bug report
            raise
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError on a path: what failed, on which path(s), and what to check."""
    paths = [redact(str(p)) for p in (exc.filename, exc.filename2) if p is not None]
    reason = exc.strerror or redact(exc)
    where = f" ({' -> '.join(paths)})" if paths else ""
    return (f"{reason}{where}. Check that the path exists and that you can read (inputs) or "
            "write (--out) it; -v shows the traceback.")
