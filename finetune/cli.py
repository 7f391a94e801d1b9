"""The ``finetune`` command line: parses arguments, calls the library, prints results.

Exit codes: 0 success, 2 the input is at fault (every problem printed, located), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TextIO

from finetune.errors import FinetuneError, IssuesError
from finetune.registry import Registry, Status
from finetune.settings import Settings, get_settings

EXIT_OK, EXIT_FAIL, EXIT_INVALID = 0, 1, 2


#: Where the running command's results go: the real standard output, saved by :func:`_stdout_for_results`.
_RESULTS: ContextVar[TextIO | None] = ContextVar("finetune_cli_results", default=None)


def _out(*values: object, end: str = "\n") -> None:
    """Print results (not diagnostics) to the real standard output, like :func:`print`."""
    print(*values, end=end, file=_RESULTS.get() or sys.stdout)


def _print_json(data: Any) -> None:
    _out(json.dumps(data, indent=2, ensure_ascii=False))


def _registry(settings: Settings) -> Registry:
    return Registry.load(settings.registry, settings.lock_path)


# ------------------------------------------------------------------------------------ recipes


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.validate import validate_file

    registry = _registry(settings)
    results = []
    for path in args.files:
        recipe, issues = validate_file(Path(path), registry, settings.recipe_limits)
        results.append({"file": path, "valid": recipe is not None, "issues": [i.as_dict() for i in issues]})
        if not args.json:
            if recipe is not None:
                _out(f"{path}: OK")
            for issue in issues:
                _out(issue)
    if args.json:
        _print_json(results)
    return EXIT_OK if all(r["valid"] for r in results) else EXIT_INVALID


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.schema import recipe_json_schema_text

    _out(recipe_json_schema_text(), end="")
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
        _out(f"{status.value} ({len(group)})")
        for e in group:
            size = f"{e.params_b:g}B" if e.params_b else "-"
            extra = f"  {e.reason}" if e.status is not Status.APPROVED else f"  {'/'.join(e.methods)}"
            _out(f"  {e.id:<{width}}  {size:>6}  {e.developer.entity} ({e.developer.country}){extra}")
    return EXIT_OK


def cmd_models_show(args: argparse.Namespace, settings: Settings) -> int:
    registry = _registry(settings)
    entry = registry.get(args.id)
    if entry is None:
        from finetune.validate import unknown_model_issue

        issue = unknown_model_issue(args.id, registry)
        raise IssuesError([issue], issue.message)
    data = entry.model_dump(mode="json")
    data["verdict"] = registry.verdict(entry).as_dict()
    if entry.chat is not None:
        data["chat"]["template_text"] = registry.chat_template(entry)
    if args.json:
        _print_json(data)
    else:
        import yaml

        _out(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    return EXIT_OK


def cmd_models_check(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.modelstore import check_folder

    report = check_folder(Path(args.dir), args.developer, args.country, _registry(settings))
    if args.json:
        _print_json(report.as_dict())
    else:
        _out(f"{report.folder}: {report.status} ({report.verdict.decision.value})")
        for reason in report.verdict.reasons:
            _out(f"  - {reason}")
        if report.identical_to:
            _out(f"  weights identical to registry entries: {', '.join(report.identical_to)}")
        _out(f"  {len(report.files)} files hashed; model_type {report.model_type}")
    return EXIT_INVALID if report.status == "denied" else EXIT_OK


def cmd_models_review(args: argparse.Namespace, settings: Settings) -> int:
    import getpass

    from finetune.modelstore import check_folder
    from finetune.reviews import ReviewStatus, record_review, reviews_dir

    report = check_folder(Path(args.dir), args.developer, args.country, _registry(settings))
    status = ReviewStatus.APPROVED if args.approve else ReviewStatus.DENIED
    record = record_review(
        reviews_dir(settings.data_dir), report, status=status, reviewer=args.reviewer or getpass.getuser(),
        reason=args.reason,
    )  # fmt: skip
    if args.json:
        _print_json(record.model_dump(mode="json"))
    else:
        _out(f"{args.dir}: {record.status} by {record.reviewer} ({record.digest[:16]}, {len(record.files)} files)")
    return EXIT_OK


def cmd_models_import(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.modelstore import import_snapshot

    dest = import_snapshot(
        Path(args.snapshot), args.id, _registry(settings), settings.store_path, settings.lock_path, args.revision
    )
    _out(f"imported {args.id} into {dest}")
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
    _out(f"tiny random-weight {entry.id} written to {dest}")
    return EXIT_OK


# ------------------------------------------------------------------------------------ data


def _folder_name(name: str) -> str:
    """A recipe's name made safe as one folder name (it may not lead anywhere else)."""
    return re.sub(r"[^\w.-]+", "_", name).strip(".") or "recipe"


def _data_report_path(settings: Settings, recipe_name: str) -> Path:
    """``<data dir>/reports/<name>/data_report.json``."""
    return settings.data_dir / "reports" / _folder_name(recipe_name) / "data_report.json"


def _recipe(args: argparse.Namespace, registry: Registry, settings: Settings) -> tuple[Any, Any]:
    """The recipe of ``args.recipe`` and the folder acting as the tenant's bucket (``--bucket``)."""
    from finetune.storage import Bucket
    from finetune.validate import load_recipe

    recipe_path = Path(args.recipe)
    recipe = load_recipe(recipe_path, registry, settings.recipe_limits)
    return recipe, Bucket.folder(Path(args.bucket) if args.bucket else recipe_path.parent)


def cmd_data_inspect(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.data.pipeline import DataError
    from finetune.prepare import prepare_job

    registry = _registry(settings)
    recipe, bucket = _recipe(args, registry, settings)
    report_path = _data_report_path(settings, recipe.name or Path(args.recipe).stem)
    try:
        job = prepare_job(
            recipe, bucket, settings, registry=registry, workers=args.workers, use_cache=not args.no_cache
        )
    except DataError as exc:
        if exc.report is not None:
            print(f"finetune: the data report, as far as it got, is in {exc.report.save(report_path)}", file=sys.stderr)
        raise
    job.report.save(report_path)
    if args.json:
        _print_json(job.report.as_dict())
    else:
        _out("\n".join(job.report.summary_lines(str(report_path))))
    return EXIT_OK


def cmd_estimate(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.estimate import estimate_recipe

    registry = _registry(settings)
    recipe, bucket = _recipe(args, registry, settings)
    estimate = estimate_recipe(
        recipe,
        bucket,
        settings,
        registry=registry,
        device=args.gpu,
        results=Path(args.results) if args.results else None,
        workers=args.workers,
        label=args.recipe,
    )
    if args.json:
        _print_json(estimate.as_dict())
    else:
        _out("\n".join(estimate.summary_lines()))
    return EXIT_OK if estimate.can_estimate_time else EXIT_FAIL


# ------------------------------------------------------------------------------------ training

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped after a checkpoint; the same command resumes


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.jobstore import JobStore
    from finetune.train.launch import launch, plan_job

    registry = _registry(settings)
    recipe, bucket = _recipe(args, registry, settings)
    name = _folder_name(recipe.name or Path(args.recipe).stem)
    store = JobStore.folder(Path(args.output) if args.output else settings.data_dir / "jobs" / name)
    spec, job = plan_job(recipe, bucket, store, settings, registry=registry, workers=args.workers, progress=True)
    report = job.report
    _out(f"job folder     {store.describe()}")
    _out(
        f"data           {report.train_samples} train / {report.eval_samples} eval samples, "
        f"{report.tokens_train:,} tokens, {report.problems_total} rows refused (data_report.json)"
    )
    launcher = args.launcher if args.launcher != "auto" else ("ray" if spec.workers > 1 else "local")
    summary = launch(spec, launcher, settings)
    if summary.preempted:
        _out(f"stopped at step {summary.steps} after a checkpoint; run the same command to resume")
        return EXIT_PREEMPTED
    final = store.describe(summary.final.removeprefix(store.prefix).lstrip("/")) if summary.final else None
    _out(f"done           {summary.steps} steps; final model in {final}")
    if summary.eval:
        _out(f"eval           loss {summary.eval['eval_loss']:.4f}, perplexity {summary.eval['eval_ppl']:.2f}")
    return EXIT_OK


# ------------------------------------------------------------------------------------ archive


def cmd_archive_build(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.archive import build_archive
    from finetune.archive.layout import parse_size
    from finetune.jobstore import JobStore

    job_dir = Path(args.job_dir)
    if not job_dir.is_dir():
        print(f"finetune: {job_dir} is not a job folder", file=sys.stderr)
        return EXIT_INVALID
    try:
        shard_size = parse_size(args.shard_size)
    except ValueError as exc:
        print(f"finetune: --shard-size: {exc}", file=sys.stderr)
        return EXIT_INVALID
    result = build_archive(
        JobStore.folder(job_dir),
        Path(args.out),
        registry=_registry(settings),
        settings=settings,
        checkpoint=args.checkpoint,
        contents=args.contents,
        shard_size=shard_size,
    )
    if args.publish:
        from finetune.archive import publish_archive

        job = result.manifest["job"]
        publish_archive(JobStore.folder(job_dir), result.path, settings.signer(), {"name": result.manifest["name"],
                                                                                   "step": job["step"]})  # fmt: skip
    if args.json:
        _print_json(result.as_dict())
        return EXIT_OK
    info = result.as_dict()
    _out(f"archive        {info['archive']} ({info['size']:,} bytes, {info['files']} files)")
    _out(f"weights        {', '.join(f'{k} in {v}/' for k, v in info['contents'].items())} from the {info['source']}")
    use = info["usage"]
    cost = f"{use['points']:.4f} points" if use["device_kind"] == "gpu" else "no GPU held, no points"
    _out(f"compute        {use['devices']} x {use['device']}: {use['device_hours']:.4f} device-hours, {cost}")
    _out(f"check it with  finetune archive verify {info['archive']}")
    return EXIT_OK


def cmd_archive_verify(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.archive import verify_archive
    from finetune.signing import SigningError, VerifyKey

    key: VerifyKey | None = None
    if args.public_key:
        try:
            key = VerifyKey.from_base64(args.public_key)
        except SigningError as exc:
            print(f"finetune: --public-key: {exc}", file=sys.stderr)
            return EXIT_INVALID
    elif settings.signing_key or settings.signing_key_path.is_file():  # never make a key just to verify
        key = settings.signer().public
    base = Path(args.base) if args.base else None
    report = verify_archive(Path(args.file), key=key, base=base, load=not args.no_load)
    if args.json:
        _print_json(report.as_dict())
    else:
        for problem in report.problems:
            _out(problem)
        for note in report.notes:
            _out(f"note: {note}")
        if report.ok:
            for check in report.checks:
                _out(f"ok: {check}")
            _out(f"OK {args.file}")
        else:
            _out(f"FAILED {args.file}: {len(report.problems)} problem(s)")
    return EXIT_OK if report.ok else EXIT_INVALID


def cmd_archive_public_key(args: argparse.Namespace, settings: Settings) -> int:
    _out(settings.signer().public.base64())
    return EXIT_OK


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
    p = msub.add_parser("review", help="record an operator's origin review of an uploaded model folder")
    p.add_argument("dir")
    p.add_argument("--developer", required=True, help="the developer entity the review found")
    p.add_argument("--country", required=True, help="that developer's country (ISO code, e.g. TW)")
    decision = p.add_mutually_exclusive_group(required=True)
    decision.add_argument("--approve", action="store_true", help="these exact files may be trained")
    decision.add_argument("--deny", action="store_true", help="these exact files may not be trained")
    p.add_argument("--reason", required=True, help="why, for the record")
    p.add_argument("--reviewer", help="who decided (default: the current user)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_review)
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
    p.add_argument(
        "--shard-size", default="5GB", metavar="SIZE", help="largest safetensors shard of the merged model (5GB)"
    )
    p.add_argument("--publish", action="store_true", help="also publish it, signed, into the job folder's archive/")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=cmd_archive_build)
    p = asub.add_parser("verify", help="check an archive's members, digests and model; OK or every problem")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--base", metavar="DIR", help="base model folder for checking an adapter (default: the store)")
    p.add_argument("--no-load", action="store_true", help="check members and digests only, load no model")
    p.add_argument(
        "--public-key",
        metavar="BASE64",
        help="the platform's published public key (default: this platform's own, when its key is here)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_archive_verify)
    p = asub.add_parser("public-key", help="print the platform's public key (base64), which verifies its archives")
    p.set_defaults(func=cmd_archive_public_key)

    from finetune.service.cli import add_service_commands  # here: it imports this module's helpers

    add_service_commands(sub)
    return parser


def _quiet_libraries() -> None:
    """No progress bars from the Hugging Face libraries: the CLI prints its own report."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _flush_c_stdio() -> None:
    """Flush C's stdio buffers, so what a C library printf'd still lands where stdout pointed."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (AttributeError, OSError, TypeError):  # no C library to load by that name (Windows)
        pass


def _is_process_stdout(stream: TextIO) -> bool:
    """Whether ``stream`` is the interpreter's own stdout on file descriptor 1 (not a redirect)."""
    if stream is None or stream is not sys.__stdout__:
        return False
    try:
        return stream.fileno() == 1
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def _stdout_for_results() -> Iterator[TextIO]:
    """Yield the real standard output for the command's results; meanwhile stdout goes to stderr.

    Libraries print to stdout (DeepSpeed's accelerator warning on first import, C extensions),
    which would corrupt ``--json`` output. Python-level writes are redirected through
    ``sys.stdout``; when stdout is the process's own (file descriptor 1), fd 1 is pointed at
    stderr too, for C-level writes and child processes. A caller's redirected ``sys.stdout``
    (tests) keeps the results and gets the Python-level redirect only.
    """
    results = sys.stdout
    if not _is_process_stdout(results):
        with contextlib.redirect_stdout(sys.stderr):
            yield results
        return
    results.flush()
    saved = os.dup(1)
    real = open(saved, "w", buffering=1, encoding=results.encoding, errors=results.errors, closefd=False)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield real
    finally:
        results.flush()  # writes to fd 1 during the command: they belong on stderr
        _flush_c_stdio()
        real.close()
        os.dup2(saved, 1)
        os.close(saved)


def _error_json(exc: FinetuneError) -> dict[str, Any]:
    """An error for ``--json`` output: summary, every located issue, and a partial data report."""
    issues = exc.issues if isinstance(exc, IssuesError) else []
    summary = getattr(exc, "summary", None) or str(exc).split("\n", 1)[0]
    document: dict[str, Any] = {"error": summary, "fault": exc.fault, "issues": [i.as_dict() for i in issues]}
    report = getattr(exc, "report", None)  # a DataError's; duck-typed to keep the data pipeline unimported
    if report is not None:
        document["report"] = report.as_dict()
    return document


def _run(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        return func(args, get_settings())
    except FinetuneError as exc:
        print(f"finetune: {exc}", file=sys.stderr)
        if getattr(args, "json", False):
            _print_json(_error_json(exc))
        return EXIT_INVALID if isinstance(exc, IssuesError) or exc.fault == "tenant" else EXIT_FAIL
    except Exception as exc:  # a bug: its traceback goes to stderr, and --json output stays JSON
        if getattr(args, "json", False):
            _print_json({"error": f"internal error: {type(exc).__name__}: {exc}", "issues": []})
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        _quiet_libraries()
    with _stdout_for_results() as results:
        token = _RESULTS.set(results)
        try:
            return _run(args)
        finally:
            _RESULTS.reset(token)


if __name__ == "__main__":
    sys.exit(main())
