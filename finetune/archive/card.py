"""The archive's report: usage from the metrics, the loss-curve picture, the model card.

Nothing here reads the dataset: the card gives the data report's counts and lengths, never a
row or a sample.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.archive.source import JobSource
from finetune.events import Event, latest_by_step

POINTS_PER_GPU_HOUR = 2.0  # PLATFORM.md P3: 1 point = 0.5 GPU-hour


@dataclass(frozen=True)
class Usage:
    """Time the job's training processes ran, from its metrics (every start/resume to its last record)."""

    seconds: float
    device: str
    device_kind: str
    devices: int
    segments: int

    @property
    def device_hours(self) -> float:
        return self.seconds * self.devices / 3600.0

    @property
    def gpu_hours(self) -> float:
        return self.device_hours if self.device_kind == "gpu" else 0.0

    @property
    def points(self) -> float:
        return self.gpu_hours * POINTS_PER_GPU_HOUR

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_seconds": round(self.seconds, 1),
            "device": self.device,
            "device_kind": self.device_kind,
            "devices": self.devices,
            "runs": self.segments,
            "device_hours": round(self.device_hours, 4),
            "gpu_hours": round(self.gpu_hours, 4),
            "points": round(self.points, 4),
        }


def usage(events: Sequence[Event], default_devices: int) -> Usage:
    """Sum each run of the job (a start or resume event up to the last event before the next one)."""
    seconds, segments = 0.0, 0
    begin: float | None = None
    last: float | None = None
    device, kind, count = "unknown", "gpu", default_devices
    for event in events:
        stamp = event.time
        if event.kind in ("start", "resume"):
            if begin is not None and last is not None:
                seconds += last - begin
            begin, segments = stamp, segments + 1
            hardware = event.hardware
            device = str(hardware.get("device", device))
            kind = str(hardware.get("kind", kind))
            count = int(hardware.get("count", count))
        last = stamp
    if begin is not None and last is not None:
        seconds += last - begin
    return Usage(seconds=max(0.0, seconds), device=device, device_kind=kind, devices=count, segments=segments)


def loss_curve_png(events: Sequence[Event], dest: Path, title: str, mark_step: int | None = None) -> None:
    """Training loss (and evaluation loss, when there is any) by optimizer step, as a PNG.

    ``mark_step`` draws a vertical line at the step of an archived checkpoint.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    train = [(e.step, e.loss) for e in latest_by_step(events, "step")]
    evals = [(e.step, e.eval_loss) for e in latest_by_step(events, "eval")]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="evaluation loss", linewidth=1.2, markersize=4)
    if mark_step is not None:
        ax.axvline(mark_step, color="grey", linestyle="--", linewidth=1, label=f"archived checkpoint ({mark_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per trained token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if train or evals or mark_step is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(str(dest), format="png", metadata={"Software": None})


def _hyper_parameters(recipe_json: dict[str, Any]) -> list[str]:
    method, training, data = recipe_json["method"], recipe_json["training"], recipe_json["data"]
    lines = [f"- method: {method['type']}"]
    if method["type"] in ("lora", "qlora"):
        targets = method.get("target_modules")
        rank, alpha, dropout = method["rank"], method["alpha"], method["dropout"]
        lines.append(f"- LoRA rank {rank}, alpha {alpha}, dropout {dropout}, on {targets}")
    keys = ("epochs", "max_steps", "learning_rate", "scheduler", "warmup_ratio", "weight_decay", "micro_batch_size",
            "tokens_per_step", "max_grad_norm", "seed")  # fmt: skip
    lines += [f"- {k}: {training[k]}" for k in keys if training.get(k) is not None]
    lines.append(f"- max sequence length {data['max_seq_len']}, packing {'on' if data.get('packing') else 'off'}")
    return lines


def model_card(src: JobSource, meta: dict[str, Any]) -> str:
    """The README.md of the archive (markdown), from the manifest's metadata."""
    base, job, use, data = meta["base_model"], meta["job"], meta["usage"], meta["data"]
    lines = [
        f"# {meta['name']}",
        "",
        f"Fine-tuned from **{base['name']}** (`{base['repo'] or base['id']}`) with the finetune engine "
        f"{meta['engine']['version']}, {job['method']} method, weights from the {job['source']} (step {job['step']}).",
    ]
    if src.recipe.model.tiny:
        lines += ["", "> A dry run: the base model is a tiny random-weight model of its architecture."]
    lines += [
        "",
        "## Base model",
        "",
        f"- id: `{base['id']}`, revision `{base['revision']}`",
        f"- developer: {base['developer']} ({base['country']})",
        f"- licence: {base['license'] or 'see the base model'} — the fine-tuned model is bound by it",
        f"- origin check: {base['origin']['decision']} ({'; '.join(base['origin']['reasons'])})",
        "",
        "## Contents",
        "",
    ]
    if "merged" in meta["contents"]:
        lines.append(
            f"- `{meta['contents']['merged']}/`: the complete model ({meta['weights_dtype']}), for "
            "`AutoModelForCausalLM.from_pretrained(...)`"
        )
    if "adapter" in meta["contents"]:
        lines.append(
            f"- `{meta['contents']['adapter']}/`: the LoRA adapter, for `PeftModel.from_pretrained(base, ...)`"
        )
    lines += [
        "- `recipe.json` (the resolved recipe), `metrics.jsonl`, `loss_curve.png`, `data_stats.json`",
        "- `manifest.json`: size and sha256 of every file; check with `finetune archive verify FILE`",
        "",
        f"Generation stops at the end-of-turn token `{meta['eot']}`: `generation_config.json` lists it among the "
        f"EOS ids ({meta['stop_token_ids']}).",
        "",
        "## Training",
        "",
        *_hyper_parameters(src.recipe_json),
        "",
        "## Data (statistics only)",
        "",
        f"- {data.get('rows_used', '?')} rows used of {data.get('rows_read', '?')} read "
        f"({data.get('problems_total', 0)} refused, {data.get('duplicates', 0)} duplicates)",
        f"- {data.get('train_samples', '?')} training and {data.get('eval_samples', '?')} evaluation samples; "
        f"{data.get('tokens_train', '?')} training tokens, {data.get('trained_tokens_train', '?')} of them trained",
        f"- sample lengths: {json.dumps(data.get('lengths', {}))}",
        "",
        "## Results",
        "",
    ]
    ev = job.get("eval")
    if ev:
        lines.append(f"- evaluation loss {ev['eval_loss']:.4f}, perplexity {ev['eval_ppl']:.2f} (step {ev['step']})")
    else:
        lines.append("- no evaluation split")
    if job.get("final_train_loss") is not None:
        lines.append(f"- last training loss {job['final_train_loss']:.4f}")
    lines += [
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Compute",
        "",
        f"- hardware: {use['devices']} x {use['device']} ({use['device_kind']})",
        f"- training time {use['wall_seconds'] / 3600:.3f} h over {use['runs']} run(s): "
        f"{use['device_hours']:.3f} device-hours",
    ]
    if use["device_kind"] == "gpu":
        lines.append(f"- {use['gpu_hours']:.3f} GPU-hours = {use['points']:.2f} points (1 point = 0.5 GPU-hour)")
    else:
        lines.append("- CPU run: no GPU-hours, no points")
    lines += [
        "- measured from the job's metrics (training processes only); the platform's usage ledger, which counts"
        " every GPU held from allocation to release, is authoritative for points",
        "",
    ]
    return "\n".join(lines)
