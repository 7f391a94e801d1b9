"""The ``finetune`` command line: parses arguments, calls the library, prints results.

Exit codes: 0 success, 2 invalid input (every problem printed, located), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError, IssuesError
from finetune.registry import Registry, Status
from finetune.settings import Settings, get_settings

EXIT_OK, EXIT_FAIL, EXIT_INVALID = 0, 1, 2


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _registry(settings: Settings) -> Registry:
    return Registry.load(settings.registry, settings.lock_path)


# ------------------------------------------------------------------------------------ recipes


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.validate import validate_file

    registry = _registry(settings)
    results = []
    for path in args.files:
        recipe, issues = validate_file(Path(path), registry)
        results.append({"file": path, "valid": recipe is not None, "issues": [i.as_dict() for i in issues]})
        if not args.json:
            if recipe is not None:
                print(f"{path}: OK")
            for issue in issues:
                print(issue)
    if args.json:
        _print_json(results)
    return EXIT_OK if all(r["valid"] for r in results) else EXIT_INVALID


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.schema import recipe_json_schema_text

    sys.stdout.write(recipe_json_schema_text())
    return EXIT_OK


# ------------------------------------------------------------------------------------ models


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    registry = _registry(settings)
    entries = [e for e in registry if args.status is None or e.status.value == args.status]
    if args.json:
        _print_json([e.summary() for e in entries])
        return EXIT_OK
    width = max((len(e.id) for e in entries), default=10)
    for status in Status:
        group = [e for e in entries if e.status is status]
        if not group:
            continue
        print(f"{status.value} ({len(group)})")
        for e in group:
            size = f"{e.params_b:g}B" if e.params_b else "-"
            extra = f"  {e.reason}" if e.status is not Status.APPROVED else f"  {'/'.join(e.methods)}"
            print(f"  {e.id:<{width}}  {size:>6}  {e.developer.entity} ({e.developer.country}){extra}")
    return EXIT_OK


def cmd_models_show(args: argparse.Namespace, settings: Settings) -> int:
    registry = _registry(settings)
    entry = registry.get(args.id)
    if entry is None:
        from finetune.validate import unknown_model_issue

        print(f"finetune: {unknown_model_issue(args.id, registry).message}", file=sys.stderr)
        return EXIT_INVALID
    data = entry.model_dump(mode="json")
    data["verdict"] = registry.verdict(entry).as_dict()
    if entry.chat is not None:
        data["chat"]["template_text"] = registry.chat_template(entry)
    if args.json:
        _print_json(data)
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    return EXIT_OK


def cmd_models_check(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.modelstore import check_folder

    report = check_folder(Path(args.dir), args.developer, args.country, _registry(settings))
    if args.json:
        _print_json(report.as_dict())
    else:
        print(f"{report.folder}: {report.status} ({report.verdict.decision.value})")
        for reason in report.verdict.reasons:
            print(f"  - {reason}")
        if report.identical_to:
            print(f"  weights identical to registry entries: {', '.join(report.identical_to)}")
        print(f"  {len(report.files)} files hashed; model_type {report.model_type}")
    return EXIT_INVALID if report.status == "denied" else EXIT_OK


def cmd_models_import(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.modelstore import import_snapshot

    dest = import_snapshot(
        Path(args.snapshot), args.id, _registry(settings), settings.store_path, settings.lock_path, args.revision
    )
    print(f"imported {args.id} into {dest}")
    return EXIT_OK


def cmd_models_materialize(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.modelstore import TINY_REVISION, model_dir
    from finetune.tiny import materialize_tiny

    registry = _registry(settings)
    entry = registry.get(args.id)
    if entry is None or entry.status is not Status.APPROVED:
        print(f"finetune: '{args.id}' is not an approved model", file=sys.stderr)
        return EXIT_INVALID
    dest = Path(args.dest) if args.dest else model_dir(settings.store_path, entry.id, TINY_REVISION)
    materialize_tiny(entry, registry.chat_template(entry), dest, seed=args.seed)
    print(f"tiny random-weight {entry.id} written to {dest}")
    return EXIT_OK


# ------------------------------------------------------------------------------------ data


def cmd_data_inspect(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.data.pipeline import prepare
    from finetune.loading import load_tokenizer, model_folder
    from finetune.storage import Bucket
    from finetune.validate import load_recipe

    registry = _registry(settings)
    recipe_path = Path(args.recipe)
    recipe = load_recipe(recipe_path, registry)
    bucket = Bucket.folder(Path(args.bucket) if args.bucket else recipe_path.parent)
    folder = model_folder(recipe, registry, settings.store_path, bucket)
    entry = registry.get(recipe.model.id) if recipe.model.id else None
    prepared = prepare(
        recipe,
        bucket,
        load_tokenizer(folder),
        model_dir=folder,
        eot=entry.chat.eot if entry is not None and entry.chat is not None else None,
        cache_dir=None if args.no_cache else settings.data_dir / "cache" / "data",
        workers=args.workers,
    )
    if args.json:
        _print_json(prepared.report.as_dict())
    else:
        print("\n".join(prepared.report.summary_lines()))
    return EXIT_OK


def cmd_estimate(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.estimate import estimate_recipe

    estimate = estimate_recipe(
        Path(args.recipe),
        settings,
        registry=_registry(settings),
        device=args.gpu,
        results=Path(args.results) if args.results else None,
        bucket_dir=Path(args.bucket) if args.bucket else None,
        workers=args.workers,
    )
    if args.json:
        _print_json(estimate.as_dict())
    else:
        print("\n".join(estimate.summary_lines()))
    return EXIT_OK if estimate.can_estimate_time else EXIT_FAIL


# ------------------------------------------------------------------------------------ training

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped after a checkpoint; the same command resumes


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.train.launch import launch, plan_job

    spec, report = plan_job(
        Path(args.recipe),
        settings,
        registry=_registry(settings),
        output=Path(args.output) if args.output else None,
        bucket_dir=Path(args.bucket) if args.bucket else None,
        workers=args.workers,
        progress=True,
    )
    print(f"job folder     {spec.job_dir}")
    print(
        f"data           {report['train_samples']} train / {report['eval_samples']} eval samples, "
        f"{report['tokens_train']:,} tokens, {report['problems_total']} rows refused (data_report.json)"
    )
    workers = int(spec.recipe["resources"]["gpus"])
    launcher = args.launcher if args.launcher != "auto" else ("ray" if workers > 1 else "local")
    summary = launch(spec, launcher)
    if summary.get("preempted"):
        print(f"stopped at step {summary['steps']} after a checkpoint; run the same command to resume")
        return EXIT_PREEMPTED
    print(f"done           {summary.get('steps')} steps; final model in {summary.get('final')}")
    if summary.get("eval"):
        print(f"eval           loss {summary['eval']['eval_loss']:.4f}, perplexity {summary['eval']['eval_ppl']:.2f}")
    return EXIT_OK


# ------------------------------------------------------------------------------------ archive


def cmd_archive_build(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.archive import build_archive

    result = build_archive(
        Path(args.job_dir),
        Path(args.out),
        registry=_registry(settings),
        store=settings.store_path,
        checkpoint=args.checkpoint,
        contents=args.contents,
        shard_size=args.shard_size,
    )
    if args.json:
        _print_json(result.as_dict())
        return EXIT_OK
    info = result.as_dict()
    print(f"archive        {info['archive']} ({info['size']:,} bytes, {info['files']} files)")
    print(f"weights        {', '.join(f'{k} in {v}/' for k, v in info['contents'].items())} from the {info['source']}")
    use = info["usage"]
    cost = f"{use['points']:.4f} points" if use["device_kind"] == "gpu" else "no GPU held, no points"
    print(f"compute        {use['devices']} x {use['device']}: {use['device_hours']:.4f} device-hours, {cost}")
    print(f"check it with  finetune archive verify {info['archive']}")
    return EXIT_OK


def cmd_archive_verify(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.archive import verify_archive

    report = verify_archive(Path(args.file), base=Path(args.base) if args.base else None, load=not args.no_load)
    if args.json:
        _print_json(report.as_dict())
    else:
        for problem in report.problems:
            print(problem)
        for note in report.notes:
            print(f"note: {note}")
        if report.ok:
            for check in report.checks:
                print(f"ok: {check}")
            print(f"OK {args.file}")
        else:
            print(f"FAILED {args.file}: {len(report.problems)} problem(s)")
    return EXIT_OK if report.ok else EXIT_INVALID


# ------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tuning engine of the GPU-grant platform.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check recipe files; exit 2 listing every problem")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the recipe JSON Schema (2020-12)")
    p.set_defaults(func=cmd_schema)

    models = sub.add_parser("models", help="the model registry and the offline model store")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    p = msub.add_parser("list", help="registry entries by status")
    p.add_argument("--json", action="store_true")
    p.add_argument("--status", choices=[s.value for s in Status])
    p.set_defaults(func=cmd_models_list)
    p = msub.add_parser("show", help="one registry entry with its origin verdict")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_show)
    p = msub.add_parser("check", help="review an uploaded model folder (custom model)")
    p.add_argument("dir")
    p.add_argument("--developer", required=True, help="declared developer entity")
    p.add_argument("--country", required=True, help="declared developer country (ISO code, e.g. TW)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_check)
    p = msub.add_parser("import", help="verify a snapshot folder and copy it into the model store")
    p.add_argument("snapshot", metavar="SNAPSHOT_DIR")
    p.add_argument("--id", required=True, help="registry id")
    p.add_argument("--revision", help="commit of the snapshot, when the registry does not pin one")
    p.set_defaults(func=cmd_models_import)
    p = msub.add_parser("materialize", help="write a tiny random-weight model of a registry architecture")
    p.add_argument("id")
    p.add_argument("--tiny", action="store_true", required=True, help="random weights, scaled down (required)")
    p.add_argument("--dest", help="output folder (default: the model store's tiny-random folder)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_models_materialize)

    p = sub.add_parser("train", help="fine-tune as a recipe says; the same command resumes an interrupted job")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument(
        "--launcher",
        choices=["auto", "local", "ray"],
        default="auto",
        help="local: one process; ray: Ray Train workers; auto: local for one worker, else ray",
    )
    p.add_argument("--workers", type=int, help="workers (GPUs), overriding resources.gpus")
    p.add_argument("--output", help="job folder (default: <data dir>/jobs/<recipe name>)")
    p.add_argument("--bucket", help="folder acting as your bucket (default: the recipe's folder)")
    p.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="the dataset pipeline")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = dsub.add_parser("inspect", help="read, check, tokenise and pack a recipe's dataset; report on it")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--bucket", help="folder acting as your bucket (default: the recipe's folder)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--no-cache", action="store_true", help="prepare again even if a cached result exists")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes")
    p.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("estimate", help="tokens, FLOPs, time, GPU-hours, points and memory a recipe will take")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument(
        "--gpu",
        choices=["h100", "h100-sxm", "h100-pcie", "h200", "cpu"],
        default="h100",
        help="device: h100 (= h100-sxm, default), h100-pcie, h200, or cpu (this machine; needs a measured run)",
    )
    p.add_argument(
        "--results", metavar="DIR", help="throughput-*.json benchmark results (default: FINETUNE_BENCHMARK_RESULTS)"
    )
    p.add_argument("--bucket", help="folder acting as your bucket (default: the recipe's folder)")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes")
    p.add_argument("--json", action="store_true", help="machine-readable estimate")
    p.set_defaults(func=cmd_estimate)

    archive = sub.add_parser("archive", help="the model archive a job leaves: build and verify it")
    asub = archive.add_subparsers(dest="archive_command", required=True, metavar="SUBCOMMAND")
    p = asub.add_parser("build", help="package a finished job (or one checkpoint) as one verifiable tar file")
    p.add_argument("job_dir", metavar="JOB_DIR")
    p.add_argument("--out", required=True, metavar="FILE", help="the archive to write (.tar, or .tar.zst for zstd)")
    p.add_argument("--checkpoint", metavar="NAME", help="a checkpoint folder name (default: the final model)")
    p.add_argument(
        "--contents", choices=["merged", "adapter", "both"], help="weights to include (default: the recipe's)"
    )
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard of the merged model (default 5GB)")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=cmd_archive_build)
    p = asub.add_parser("verify", help="check an archive's members, digests and model; OK or every problem")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--base", metavar="DIR", help="base model folder for checking an adapter (default: the store)")
    p.add_argument("--no-load", action="store_true", help="check members and digests only, load no model")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_archive_verify)
    return parser


def _quiet_libraries() -> None:
    """No progress bars from the Hugging Face libraries: the CLI prints its own report."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        _quiet_libraries()
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        return func(args, get_settings())
    except IssuesError as exc:
        print(f"finetune: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except FinetuneError as exc:
        print(f"finetune: {exc}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
