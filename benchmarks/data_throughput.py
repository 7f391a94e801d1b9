"""Throughput of the data pipeline: read + normalise + tokenise (chat template, labels) + pack.

A byte-level BPE tokenizer with a realistic vocabulary (32k by default) is trained here on a
synthetic English / Traditional Chinese corpus, given Llama 3.1's chat template and special
tokens from the registry, and used on synthetic chat rows with a long-tailed length mix
(``benchmarks/synthetic.py``). Figures are tokens per second of the whole path, by number of
tokenising processes, counting every token of every packed row (real tokens, no padding).

    python benchmarks/data_throughput.py                       # 20k rows, workers 1 and 2
    python benchmarks/data_throughput.py --rows 2000 --workers 1 --out /tmp/x.json

Prints a table and writes JSON (machine, versions, settings, figures) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_setup import train_tokenizer as learn_tokenizer  # noqa: E402
from synthetic import chat_rows, write_jsonl  # noqa: E402

from finetune.data.packing import pack, packing_efficiency  # noqa: E402
from finetune.data.pipeline import read_samples, tokenize_all  # noqa: E402
from finetune.data.report import DataReport  # noqa: E402
from finetune.data.tokenize import Dropped  # noqa: E402
from finetune.data.types import TokenizedSample  # noqa: E402
from finetune.hardware import cpu_name  # noqa: E402
from finetune.recipe import Recipe  # noqa: E402
from finetune.registry import Registry  # noqa: E402
from finetune.settings import get_settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "llama-3.1-8b-instruct"


def machine() -> dict[str, Any]:
    cpu = cpu_name()
    import tokenizers
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def train_tokenizer(vocab_size: int, passages: int) -> tuple[Any, float, int]:
    """The model's chat tokenizer learned from the synthetic corpus; with the seconds it took and its vocabulary."""
    registry = Registry.load(get_settings().registry)
    entry = registry.get(MODEL)
    assert entry is not None and entry.chat is not None
    start = time.perf_counter()
    tokenizer = learn_tokenizer(entry, registry, vocab_size, passages)
    return tokenizer, time.perf_counter() - start, tokenizer.backend_tokenizer.get_vocab_size()


def run_once(path: Path, recipe: Recipe, tokenizer: Any, workers: int, eot: str) -> dict[str, Any]:
    data = recipe.data
    report = DataReport(dataset=data.path)
    t0 = time.perf_counter()
    samples, _ = read_samples(path, data.path, data, report)
    t1 = time.perf_counter()
    options = {"max_seq_len": data.max_seq_len, "truncation": data.truncation, "eot": eot}
    results = tokenize_all(samples, tokenizer, options, workers)
    t2 = time.perf_counter()
    kept = [r for r in results if isinstance(r, TokenizedSample)]
    rows = pack(kept, data.max_seq_len)
    t3 = time.perf_counter()
    tokens = sum(len(r) for r in rows)
    return {
        "workers": workers,
        "rows_read": report.rows_read,
        "samples": len(kept),
        "dropped": sum(isinstance(r, Dropped) for r in results),
        "tokens": tokens,
        "packed_rows": len(rows),
        "packing_efficiency": round(packing_efficiency(rows, data.max_seq_len), 4),
        "seconds": {"read": round(t1 - t0, 3), "tokenise": round(t2 - t1, 3), "pack": round(t3 - t2, 3)},
        "total_seconds": round(t3 - t0, 3),
        "tokens_per_second": round(tokens / (t3 - t0)),
        "tokenise_tokens_per_second": round(tokens / (t2 - t1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--corpus-passages", type=int, default=20000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    tokenizer, train_s, vocab = train_tokenizer(args.vocab, args.corpus_passages)
    print(f"tokenizer: byte-level BPE, vocab {vocab}, trained in {train_s:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        write_jsonl(path, chat_rows(args.rows, seed=0, max_tokens=args.max_seq_len))
        recipe = Recipe.model_validate(
            {
                "model": {"id": MODEL},
                "data": {"path": "chat.jsonl", "format": "messages", "max_seq_len": args.max_seq_len},
            }
        )
        runs = [run_once(path, recipe, tokenizer, w, "<|eot_id|>") for w in args.workers]
    print(f"\n{args.rows} synthetic chat rows, max_seq_len {args.max_seq_len}, packing on")
    print(
        f"{'workers':>7} {'tokens':>10} {'read s':>7} {'tokenise s':>10} {'pack s':>7} {'tokens/s':>10} {'pack eff':>8}"
    )
    for r in runs:
        s = r["seconds"]
        print(
            f"{r['workers']:>7} {r['tokens']:>10} {s['read']:>7} {s['tokenise']:>10} {s['pack']:>7} "
            f"{r['tokens_per_second']:>10} {100 * r['packing_efficiency']:>7.2f}%"
        )
    result = {
        "benchmark": "data_throughput",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "settings": {
            "rows": args.rows,
            "max_seq_len": args.max_seq_len,
            "vocab": vocab,
            "chat_template": MODEL,
            "tokenizer_training_seconds": round(train_s, 1),
            "what": "read JSONL + normalise + tokenise with chat template and labels + best-fit-decreasing pack",
            "tokens": "every token of the packed rows (no padding exists with packing)",
        },
        "runs": runs,
    }
    out = args.out or RESULTS / f"data_throughput-cpu{os.cpu_count()}-{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
