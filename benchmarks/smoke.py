"""bf16 correctness smoke of our engine: LoRA and full fine-tuning train, in bf16, on a tiny model.

For each method, on a tiny random-weight registry model and synthetic chat data (packed):

* the first step's loss in bf16 is within ``--tolerance`` (relative) of the same step in fp32
  (same weights, same rows: the bf16 path computes the same function);
* over ``--steps`` bf16 steps every gradient norm is finite and non-zero, and the mean loss of
  the last steps is below that of the first steps by at least ``--min-drop`` (relative).

    python benchmarks/smoke.py                      # bf16 on the GPU (on CPU: slow, but it runs)
    python benchmarks/smoke.py --out smoke.json

Exit status 1 when a check fails; each check is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_setup import build_model_folder, make_recipe, prepare_data  # noqa: E402
from bench_systems import run_finetune  # noqa: E402

from finetune.registry import Registry  # noqa: E402
from finetune.settings import get_settings  # noqa: E402

LEARNING_RATES = {"full": 2e-3, "lora": 1e-2}
WINDOW = 3


def check_method(
    method: str, args: argparse.Namespace, model_dir: Path, samples: list[Any], pad_id: int, model_id: str
) -> dict[str, Any]:
    def recipe(precision: str, steps: int) -> Any:
        return make_recipe(
            model_id,
            method=method,
            seq_len=args.seq_len,
            packing=True,
            micro_batch=args.micro_batch,
            steps=steps,
            warmup=1,
            precision=precision,
            grad_ckpt=False,
            lr=LEARNING_RATES[method],
        )

    fp32 = run_finetune(recipe("fp32", 1), model_dir, samples, pad_id).steps[1]
    bf16 = run_finetune(recipe("bf16", args.steps), model_dir, samples, pad_id).steps[1:]
    losses, norms = [s.loss for s in bf16], [s.grad_norm for s in bf16]
    first, last = statistics.fmean(losses[:WINDOW]), statistics.fmean(losses[-WINDOW:])
    gap = abs(bf16[0].loss - fp32.loss) / abs(fp32.loss)
    checks = {
        "first loss bf16 ~ fp32": gap <= args.tolerance,
        "grad norms finite and > 0": all(0.0 < g < float("inf") for g in norms),
        "loss falls": last < first * (1 - args.min_drop),
    }
    return {
        "method": method,
        "loss_fp32_step1": fp32.loss,
        "loss_bf16_step1": bf16[0].loss,
        "relative_gap": gap,
        "loss_first": first,
        "loss_last": last,
        "grad_norm_min": min(norms),
        "losses": losses,
        "checks": checks,
        "ok": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b-instruct")
    p.add_argument("--methods", nargs="+", default=["lora", "full"], choices=("lora", "full"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--passages", type=int, default=1000)
    p.add_argument("--tolerance", type=float, default=0.02, help="bf16 vs fp32 first-step loss, relative")
    p.add_argument("--min-drop", type=float, default=0.02, help="least relative fall of the loss")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    registry = Registry.load(get_settings().registry)
    entry = registry.get(args.model)
    if entry is None or entry.chat is None:
        raise SystemExit(f"{args.model}: not a registry model with a chat template")
    results = []
    with tempfile.TemporaryDirectory(prefix="smoke-") as tmp:
        work = Path(tmp)
        model_dir = build_model_folder(
            entry, registry, work / "model", size="tiny", vocab=args.vocab, passages=args.passages
        )
        pad_id = int(json.loads((model_dir / "config.json").read_text())["pad_token_id"])
        any_recipe = make_recipe(
            args.model,
            method="full",
            seq_len=args.seq_len,
            packing=True,
            micro_batch=1,
            steps=1,
            warmup=0,
            precision="fp32",
            grad_ckpt=False,
            lr=None,
        )
        samples = prepare_data(model_dir, work / "data", any_recipe, entry.chat.eot, rows=args.rows).samples
        for method in args.methods:
            start = time.perf_counter()
            result = check_method(method, args, model_dir, samples, pad_id, args.model)
            result["seconds"] = round(time.perf_counter() - start, 1)
            results.append(result)
            for name, ok in result["checks"].items():
                print(f"{method:<5} {name:<26} {'ok' if ok else 'FAILED'}")
            print(
                f"{method:<5} loss step 1 fp32 {result['loss_fp32_step1']:.4f} bf16 {result['loss_bf16_step1']:.4f}; "
                f"bf16 loss {result['loss_first']:.4f} -> {result['loss_last']:.4f} ({result['seconds']} s)"
            )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary = {
        "benchmark": "bf16-smoke",
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "ok": all(r["ok"] for r in results),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print("smoke", "passed" if summary["ok"] else "FAILED")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
