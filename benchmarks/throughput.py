"""Training throughput of our engine against the Hugging Face Trainer, side by side, in one process.

For each ``MODEL:METHOD`` pair: a registry architecture with random weights (full size on a GPU,
scaled down by ``finetune.tiny`` on a CPU), synthetic chat data with a long-tailed length mix up
to the sequence length (``synthetic.py``), then our engine (packing on and/or off) and the
Hugging Face Trainer (``peft`` for LoRA; padding to the longest in the batch, the usual way) on
the same model folder, samples, micro batch, precision, optimizer and schedule
(``bench_systems.py``).

Figures, after ``--warmup`` steps, over ``--steps`` timed steps:

* tokens/s per GPU: real tokens (never padding) of the timed steps / their wall time;
* step time: the median timed step;
* MFU and HFU: tokens/s x FLOPs per token / the device's dense bf16 peak (``finetune.flops``:
  formulas in the JSON; no peak, no MFU, on CPUs and in fp32);
* peak memory: ``torch.cuda.max_memory_allocated`` (GPU only).

A figure counts only if every step has a finite, non-zero gradient norm and the loss falls
(mean of the last three steps below the mean of the first three); otherwise the run is marked
void, with the reason, and kept.

    python benchmarks/throughput.py                                   # tiny models on CPU
    python benchmarks/throughput.py --size full --seq-len 4096 --micro-batch 1 \\
        --run llama-3.2-1b-instruct:full --run llama-3.1-8b-instruct:lora

Prints a table and writes JSON under benchmarks/results/ (``table.py`` renders them all).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_setup import build_model_folder, make_recipe, prepare_data  # noqa: E402
from bench_systems import Measured, run_finetune, run_hf_trainer  # noqa: E402

from finetune.flops import FORMULAS, ModelShape, attention_length, flops_per_token, gpu_kind, peak_flops  # noqa: E402
from finetune.hardware import cpu_name  # noqa: E402
from finetune.registry import Registry  # noqa: E402
from finetune.settings import get_settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RUNS = ["llama-3.2-1b-instruct:full", "llama-3.2-1b-instruct:lora"]
#: Learning rates of the benchmark (both systems): high enough that a random-weight model's loss
#: visibly falls within a dozen steps, which is what makes a figure valid.
LEARNING_RATES = {"full": 1e-4, "lora": 1e-3}
#: Steps averaged at each end of the run to decide whether the loss fell.
LOSS_WINDOW = 3


def device_info() -> dict[str, Any]:
    """The device the runs use: name, kind (a ``finetune.flops`` key, or ``cpu``), count, bf16 peak."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        kind = gpu_kind(name) or name.lower().replace(" ", "-")
        return {"name": name, "kind": kind, "count": 1, "peak_flops": peak_flops(name)}
    name = cpu_name()
    return {
        "name": name,
        "kind": "cpu",
        "count": 1,
        "peak_flops": None,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def versions() -> dict[str, str | None]:
    import peft
    import transformers

    try:
        import deepspeed

        ds: str | None = deepspeed.__version__
    except ImportError:
        ds = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "deepspeed": ds,
    }


def judge(measured: Measured, warmup: int) -> tuple[bool, str | None, dict[str, float]]:
    """Whether a run's figures count: every step has a finite non-zero gradient norm, and the loss falls."""
    steps = measured.steps[1:]  # the first entry only starts the clock
    losses, norms = [s.loss for s in steps], [s.grad_norm for s in steps]
    n = min(LOSS_WINDOW, max(1, len(losses) // 3))
    first, last = statistics.fmean(losses[:n]), statistics.fmean(losses[-n:])
    timed_norms = norms[warmup:]
    figures = {"loss_first": first, "loss_last": last, "grad_norm_min": min(timed_norms) if timed_norms else 0.0}
    if len(steps) <= warmup:
        return False, f"only {len(steps)} steps ran, none after the {warmup} warm-up steps", figures
    bad = [i + 1 for i, g in enumerate(norms) if not (g == g and 0.0 < g < float("inf"))]
    if bad:
        return False, f"gradient norm zero or not finite at step(s) {bad[:5]}", figures
    if not all(x == x and abs(x) < float("inf") for x in losses):
        return False, "a loss is not finite", figures
    if not last < first:
        return (
            False,
            f"the loss did not fall ({first:.4f} over the first {n} steps, {last:.4f} over the last {n})",
            figures,
        )
    return True, None, figures


def figures_of(
    measured: Measured, *, method: str, warmup: int, attn_len: float, recompute: bool, peak: float | None
) -> dict[str, Any]:
    """Throughput figures of the timed steps (all steps after the warm-up)."""
    steps = measured.steps
    timed = [(steps[i].end - steps[i - 1].end, steps[i].tokens) for i in range(warmup + 1, len(steps))]
    seconds = sum(dt for dt, _ in timed)
    tokens = sum(n for _, n in timed)
    adapters = measured.trainable if method == "lora" else 0
    shape = ModelShape(params=measured.params, layers=measured.layers, query_width=measured.query_width)
    model_fl, hardware_fl = flops_per_token(shape, method, attn_len, adapter_params=adapters, recompute=recompute)
    rate = statistics.median(n / dt for dt, n in timed) if timed else 0.0  # the median step's rate
    valid, reason, loss = judge(measured, warmup)
    return {
        "params": measured.params,
        "adapter_params": adapters,
        "trainable_params": measured.trainable,
        "attn_len": round(attn_len, 2),
        "model_flops_per_token": model_fl,
        "hardware_flops_per_token": hardware_fl,
        "tokens_per_s_per_gpu": round(rate, 2),
        "tokens_per_s_mean": round(tokens / seconds, 2) if seconds > 0 else 0.0,
        "mfu": round(rate * model_fl / peak, 4) if peak else None,
        "hfu": round(rate * hardware_fl / peak, 4) if peak else None,
        "step_time_s": round(statistics.median(dt for dt, _ in timed), 5) if timed else 0.0,
        "steps_timed": len(timed),
        "tokens_timed": tokens,
        "peak_memory_bytes": measured.peak_memory_bytes,
        "loss_first": round(loss["loss_first"], 5),
        "loss_last": round(loss["loss_last"], 5),
        "grad_norm_min": loss["grad_norm_min"],
        "losses": [round(s.loss, 5) for s in steps[1:]],
        "valid": valid,
        "void_reason": reason,
        **measured.notes,
    }


def bench_pair(
    model_id: str, method: str, args: argparse.Namespace, registry: Registry, peak: float | None, workdir: Path
) -> list[dict[str, Any]]:
    """Every run of one model and method: our engine for each packing setting, then the baseline."""
    entry = registry.get(model_id)
    if entry is None or entry.chat is None or entry.architecture is None:
        raise SystemExit(f"{model_id}: not a registry model with an architecture and a chat template")
    model_dir = workdir / f"{model_id}-{args.size}"
    if not (model_dir / "config.json").is_file():
        print(f"building random-weight {model_id} ({args.size}) ...", flush=True)
        build_model_folder(entry, registry, model_dir, size=args.size, vocab=args.vocab, passages=args.passages)
    steps = args.warmup + args.steps
    lr = args.lr if args.lr is not None else LEARNING_RATES[method]
    recipes = {
        packing: make_recipe(
            model_id,
            method=method,
            seq_len=args.seq_len,
            packing=packing,
            micro_batch=args.micro_batch,
            steps=steps,
            warmup=args.warmup,
            precision=args.precision,
            grad_ckpt=args.grad_ckpt,
            lr=lr,
        )
        for packing in args.packing
    }
    any_recipe = next(iter(recipes.values()))
    data = prepare_data(
        model_dir,
        workdir / f"data-{model_id}-{args.size}-{args.seq_len}",
        any_recipe,
        entry.chat.eot,
        rows=args.rows,
        workers=args.data_workers,
    )
    attn_len = attention_length(data.lengths)
    pad_id = int(json.loads((model_dir / "config.json").read_text())["pad_token_id"])
    base = {
        "model": model_id,
        "architecture": entry.model_type,
        "size": args.size,
        "method": method,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "dtype": dtype_name(args.precision),
        "gradient_checkpointing": args.grad_ckpt,
        "learning_rate": lr,
    }
    common = {"method": method, "warmup": args.warmup, "attn_len": attn_len, "recompute": args.grad_ckpt, "peak": peak}
    runs = []
    for packing, recipe in recipes.items():
        print(f"  finetune   {model_id} {method} packing={packing} ...", flush=True)
        measured = run_finetune(recipe, model_dir, data.samples, pad_id)
        runs.append({"system": "finetune", **base, "packing": packing, **figures_of(measured, **common)})
    if args.baseline:
        print(f"  hf-trainer {model_id} {method} ...", flush=True)
        measured = run_hf_trainer(any_recipe, model_dir, data.samples, workdir / "hf-out")
        baseline = {"system": "hf-trainer", **base, "packing": False, **figures_of(measured, **common)}
        for run in runs:
            ok = run["valid"] and baseline["valid"] and baseline["tokens_per_s_per_gpu"] > 0
            run["speedup_vs_baseline"] = (
                round(run["tokens_per_s_per_gpu"] / baseline["tokens_per_s_per_gpu"], 3) if ok else None
            )
        baseline["speedup_vs_baseline"] = 1.0 if baseline["valid"] else None
        runs.append(baseline)
    else:
        for run in runs:
            run["speedup_vs_baseline"] = None
    for run in runs:
        run["data"] = {
            "rows": data.rows,
            "samples": len(data.samples),
            "dropped": data.dropped,
            "mean_len": round(statistics.fmean(data.lengths), 1),
            "max_len": max(data.lengths),
        }
    return runs


def dtype_name(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return precision


def print_table(runs: list[dict[str, Any]]) -> None:
    head = (
        f"{'system':<11} {'model':<24} {'size':<4} {'method':<6} {'seq':>5} {'pack':<5} {'mb':>3} {'tok/s':>10} "
        f"{'MFU':>6} {'HFU':>6} {'step s':>8} {'peak GiB':>8} {'loss':>15} {'speedup':>7}  valid"
    )
    print(head)
    for r in runs:
        mem = f"{r['peak_memory_bytes'] / 2**30:.1f}" if r["peak_memory_bytes"] else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        hfu = f"{100 * r['hfu']:.1f}%" if r["hfu"] is not None else "-"
        speed = f"{r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] is not None else "-"
        loss = f"{r['loss_first']:.3f}>{r['loss_last']:.3f}"
        print(
            f"{r['system']:<11} {r['model']:<24} {r['size']:<4} {r['method']:<6} {r['seq_len']:>5} "
            f"{'on' if r['packing'] else 'off':<5} {r['micro_batch']:>3} {r['tokens_per_s_per_gpu']:>10.0f} "
            f"{mfu:>6} {hfu:>6} {r['step_time_s']:>8.4f} {mem:>8} {loss:>15} {speed:>7}  "
            f"{'yes' if r['valid'] else 'VOID: ' + str(r['void_reason'])}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", metavar="MODEL:METHOD", help=f"repeatable (default {DEFAULT_RUNS})")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--packing", choices=("on", "off", "both"), default="both", help="our engine's packing")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (both systems)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    p.add_argument("--lr", type=float, default=None, help=f"default {LEARNING_RATES}")
    p.add_argument("--rows", type=int, default=600, help="synthetic chat rows")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary learned from the synthetic corpus")
    p.add_argument("--passages", type=int, default=3000, help="corpus passages the tokenizer learns from")
    p.add_argument("--data-workers", type=int, default=1, help="tokenising processes")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the HF Trainer")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--workdir", type=Path, default=None, help="model folders and data (default: a temporary folder)")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="folder of the JSON file throughput-KIND-DATE.json")
    p.add_argument("--out", type=Path, default=None, help="the JSON file itself (overrides --out-dir)")
    args = p.parse_args(argv)
    args.packing = {"on": [True], "off": [False], "both": [True, False]}[args.packing]
    args.pairs = []
    for item in args.run or DEFAULT_RUNS:
        model, _, method = item.partition(":")
        if method not in ("full", "lora"):
            p.error(f"--run {item}: METHOD must be full or lora")
        args.pairs.append((model, method))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("DeepSpeed", "deepspeed", "finetune", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_info()
    peak = device["peak_flops"] if dtype_name(args.precision) == "bf16" else None
    registry = Registry.load(get_settings().registry)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        workdir = args.workdir or Path(tmp)
        for model_id, method in args.pairs:
            runs += bench_pair(model_id, method, args, registry, peak, workdir)
    result = {
        "benchmark": "throughput",
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "versions": versions(),
        "settings": {
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "rows": args.rows,
            "vocab": args.vocab,
            "data": "synthetic chat rows (benchmarks/synthetic.py, seed 0), long-tailed lengths up to seq_len",
            "tokens": "real tokens only (no padding); tokens_per_s_per_gpu: median over the timed steps of the "
            "step's tokens / its wall time; tokens_per_s_mean: all timed tokens / all timed wall time",
            "step_time": "median of the timed steps, each from the end of the previous step to its own end",
            "valid": f"every step's gradient norm finite and > 0, and the mean loss of the last {LOSS_WINDOW} steps "
            f"below that of the first {LOSS_WINDOW}",
            "baseline": "transformers.Trainer (+ peft LoRA on all linear layers), DataCollatorForSeq2Seq padding "
            "to the longest in the batch, SDPA attention, default AdamW, same schedule and settings",
            "peak_flops": "dense bf16 peak of the device (finetune.flops.PEAK_BF16); none on CPU or in fp32",
        },
        "formulas": FORMULAS,
        "runs": runs,
    }
    print()
    print_table(runs)
    out = args.out or args.out_dir / f"throughput-{device['kind']}-{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten {out}")
    return result


if __name__ == "__main__":
    main()
