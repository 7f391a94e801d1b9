"""The estimate of a recipe: tokens, FLOPs, throughput, time, GPU-hours, points and memory.

It runs the parts of the engine that decide those numbers, not copies of them: the recipe
validation, the data preparation of ``finetune data inspect`` (read, check, tokenise, pack), the
step plan of :mod:`finetune.train.plan`, the FLOPs formulas of :mod:`finetune.flops`, and the
memory estimate and ZeRO choice of :mod:`finetune.train.zero`. No weights are loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.estimate.devices import Device, device_for
from finetune.estimate.model import count_on_meta, stored_weight_bytes
from finetune.estimate.result import DataFacts, Estimate, FlopsFacts, MemoryFacts, ModelFacts, PlanFacts
from finetune.estimate.table import Query, find_measurement, read_table
from finetune.estimate.timing import Allowances, Throughput, Timing, count_checkpoints, count_evaluations
from finetune.estimate.timing import throughput_for as _throughput_for
from finetune.flops import attention_length, flops_per_token
from finetune.recipe import Recipe
from finetune.registry import Registry
from finetune.settings import Settings
from finetune.storage import Bucket


def estimate_recipe(
    recipe: Recipe,
    bucket: Bucket,
    settings: Settings,
    *,
    registry: Registry,
    device: str = "h100",
    results: Path | None = None,
    workers: int = 1,
    allowances: Allowances | None = None,
    label: str | None = None,
) -> Estimate:
    """Estimate what a recipe's job will take on a device.

    Args:
        recipe: A validated recipe.
        bucket: The tenant's bucket the recipe's paths are in.
        settings: Engine settings (model store, data cache, benchmark results folder).
        registry: The model registry.
        device: ``h100`` (= ``h100-sxm``), ``h100-sxm``, ``h100-pcie``, ``h200`` or ``cpu`` (this machine).
        results: Folder of ``throughput-*.json`` results (default: ``settings.benchmark_results``).
        workers: Tokenising processes.
        allowances: The assumptions for what is not measured (default: :class:`Allowances`).
        label: What to call the recipe in the estimate (its file, on the command line).

    Returns:
        The estimate; its ``timing`` is None when no throughput can be had (a CPU without a
        recorded measurement), and everything else is still filled in.

    Raises:
        RecipeError: The recipe cannot run on the device (every issue located).
        DataError: The dataset cannot be used as the recipe says.
        ModelStoreError: A custom model is not in the bucket.
    """
    from finetune.prepare import prepare_job
    from finetune.train.launch import check_environment

    allowances = allowances or Allowances()
    dev = device_for(device)
    results = results or settings.benchmark_results
    gpus = recipe.resources.gpus
    check_environment(recipe, cuda=dev.is_gpu, devices=gpus, what=dev.kind)
    job = prepare_job(recipe, bucket, settings, registry=registry, workers=workers, stand_in=True)
    source, report, plan, rows = job.model, job.report, job.plan, job.train_rows
    packed = recipe.data.packing
    documents = [n for r in rows for n in (getattr(r, "doc_lengths", None) or [len(r)])]
    attn_len = attention_length(documents)
    counts = count_on_meta(source.config, recipe)
    bf16 = _bf16(recipe, dev)
    method = recipe.method.type
    recompute = recipe.training.gradient_checkpointing
    model_fl, hardware_fl = flops_per_token(
        counts.shape, method, attn_len, adapter_params=counts.adapters, recompute=recompute
    )
    eval_fl = flops_per_token(counts.shape, "full", attn_len)[0] / 3.0  # the forward pass: 2N + 4LHQT
    model_type = str(getattr(source.config, "model_type", "") or "unknown")

    mean_row = report.tokens_train / max(1, len(rows))
    trained_share = report.trained_tokens_train / max(1, report.tokens_train)
    tokens = plan.total_steps * plan.rows_per_step * mean_row
    data = DataFacts(
        train_samples=report.train_samples, eval_samples=report.eval_samples, refused_rows=report.problems_total,
        dropped=report.dropped, truncated=report.truncated, tokens_per_epoch=report.tokens_train,
        trained_tokens_per_epoch=report.trained_tokens_train, eval_tokens=report.tokens_eval, rows=len(rows),
        max_seq_len=recipe.data.max_seq_len, packing=packed, packing_efficiency=report.packing_efficiency,
        attn_len=round(attn_len, 2),
    )  # fmt: skip
    plan_facts = PlanFacts(
        gpus=gpus, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum, rows_per_step=plan.rows_per_step,
        steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps,
        epochs=round(plan.total_steps / plan.steps_per_epoch, 4), eval_every=plan.eval_every,
        tokens_per_step=plan.rows_per_step * mean_row, tokens=tokens, trained_tokens=tokens * trained_share,
    )  # fmt: skip
    model = ModelFacts(
        id=recipe.model.id, architecture=model_type, size=source.size, config_source=source.config_source,
        tokenizer_source=source.tokenizer_source, params=counts.params, matrix_params=counts.shape.params,
        adapter_params=counts.adapters, trainable_params=counts.trainable, layers=counts.shape.layers,
        hidden=counts.hidden, query_width=counts.shape.query_width, vocab=counts.vocab,
        dtype="bf16" if bf16 else "fp32",
    )  # fmt: skip
    flops = FlopsFacts(
        model_per_token=model_fl, hardware_per_token=hardware_fl, eval_per_token=eval_fl, recompute=recompute,
        model_total=model_fl * tokens, hardware_total=hardware_fl * tokens,
    )  # fmt: skip

    table = read_table(results, dev.kind)
    query = Query(dev.kind, recipe.model.id, model_type, source.size, method, model.dtype,
                  recipe.data.max_seq_len, plan.micro_batch, packed)  # fmt: skip
    measurement = find_measurement(table, query)
    missing = f"no valid {method} run of a {source.size} model in {model.dtype} on {dev.kind} is recorded in {results}"
    if method == "qlora" and measurement is None:
        missing += " (the throughput benchmark records full and LoRA runs only)"
    throughput = _throughput_for(
        measurement, dev, method, hardware_fl, allowances, missing=missing, tiny=source.size == "tiny"
    )
    weight_bytes = 2 if bf16 else 4
    timing = _timing(
        throughput, allowances, dev, plan=plan_facts, eval_tokens=report.tokens_eval, eval_flops=eval_fl,
        has_eval=bool(job.eval_rows), eval_every=plan.eval_every, save_every_steps=plan.save_every_steps,
        save_every_s=plan.save_every_seconds, trainable=counts.trainable, weight_bytes=weight_bytes,
        load_bytes=stored_weight_bytes(source.folder, counts.params),
        data_tokens=report.tokens_train + report.tokens_eval,
    )  # fmt: skip
    memory = _memory(recipe, dev, counts, bf16)
    estimate = Estimate(
        recipe=label or recipe.name or "recipe", name=recipe.name, method=method, device=dev, model=model, data=data,
        plan=plan_facts, flops=flops, throughput=throughput, timing=timing, memory=memory, allowances=allowances,
        warnings=list(table.skipped),
    )  # fmt: skip
    estimate.assumptions.extend(_assumptions(estimate, source.folder is None))
    return estimate


def _bf16(recipe: Recipe, device: Device) -> bool:
    """The training precision: ``auto`` is bf16 on GPUs and fp32 on CPU (``finetune.train.model``)."""
    precision = recipe.training.precision
    return precision == "bf16" or (precision == "auto" and device.is_gpu)


def _timing(
    throughput: Throughput,
    allowances: Allowances,
    device: Device,
    *,
    plan: PlanFacts,
    eval_tokens: int,
    eval_flops: float,
    has_eval: bool,
    eval_every: int,
    save_every_steps: int,
    save_every_s: float,
    trainable: int,
    weight_bytes: int,
    load_bytes: int,
    data_tokens: int,
) -> Timing | None:
    if throughput.tokens_per_s is None or throughput.flops_per_s is None:
        return None
    gpus = plan.gpus
    train_s = plan.tokens / (throughput.tokens_per_s * gpus)
    evaluations = count_evaluations(plan.total_steps, eval_every, has_eval)
    one_eval = eval_tokens * eval_flops / (throughput.flops_per_s * gpus)
    optimizer_bytes = 12 if weight_bytes == 2 else 8  # fp32 master weights (16-bit training) and two moments
    checkpoint_one = allowances.checkpoint_fixed_s + trainable * (weight_bytes + optimizer_bytes) / (
        allowances.storage_bytes_per_s
    )
    step_s = train_s / plan.total_steps
    checkpoints = count_checkpoints(
        plan.total_steps, save_every_steps, save_every_s, step_s, evaluations * one_eval / plan.total_steps
    )
    final_s = allowances.final_fixed_s + trainable * weight_bytes / allowances.storage_bytes_per_s
    startup = {
        "fixed": allowances.startup_gpu_s if device.is_gpu else allowances.startup_cpu_s,
        "model load": load_bytes / allowances.load_bytes_per_s,
        "data preparation": data_tokens / allowances.data_tokens_per_s,
    }
    return Timing(
        train_s=train_s, evaluations=evaluations, eval_s=evaluations * one_eval, checkpoints=checkpoints,
        checkpoint_s=checkpoints * checkpoint_one, final_s=final_s, startup_s=sum(startup.values()),
        startup_parts=startup,
    )  # fmt: skip


def _memory(recipe: Recipe, device: Device, counts: Any, bf16: bool) -> MemoryFacts:
    from finetune.train.zero import FIT_FRACTION, choose_zero_stage, stage_estimator, weight_bytes_for

    t, r = recipe.training, recipe.resources
    estimate = stage_estimator(
        params=counts.params + counts.adapters, trainable=counts.trainable, gpus=r.gpus,
        offload=r.offload if device.is_gpu else "none", weight_bytes=weight_bytes_for(recipe.method.type, bf16),
        grad_checkpointing=t.gradient_checkpointing, micro_batch=t.micro_batch_size, seq_len=recipe.data.max_seq_len,
        hidden=counts.hidden, layers=counts.shape.layers, vocab=counts.vocab,
    )  # fmt: skip
    stage, reason = choose_zero_stage(
        r.zero_stage, recipe.method.type, estimate, gpu_memory_bytes=device.memory_bytes if device.is_gpu else None,
        gpus=r.gpus, offload=r.offload if device.is_gpu else "none",
    )  # fmt: skip
    needed = estimate(stage)
    budget = int(device.memory_bytes * FIT_FRACTION)
    # On a CPU every process shares the machine's memory, and what "offload" moves stays there too.
    used = needed.total if device.is_gpu else (needed.total + needed.host) * r.gpus
    return MemoryFacts(
        zero_stage=stage, reason=reason, weights=needed.weights, gradients=needed.gradients,
        optimizer=needed.optimizer, activations=needed.activations, host=needed.host, per_gpu=needed.total,
        device_memory=device.memory_bytes, budget=budget, fits=used <= budget,
    )  # fmt: skip


def _assumptions(e: Estimate, stand_in: bool) -> list[str]:
    a, p = e.allowances, e.plan
    recompute = "; plus 2N + 4LHQT recomputed (gradient checkpointing)" if e.flops.recompute else ""
    out = [
        f"model config: {e.model.config_source}; tokens counted with {e.model.tokenizer_source}",
        f"tokens: {p.total_steps:,} steps x {p.rows_per_step} rows x {p.tokens_per_step / p.rows_per_step:,.1f} "
        "mean real tokens per row (the rows that fill the last step of an epoch count at the mean); "
        "every step runs (early stopping is not foreseen)",
        f"FLOPs per token: {'6N' if e.method == 'full' else '4N + 6N_adapter'} + 12LHQT with T = {e.data.attn_len:.1f} "
        f"from the document lengths{recompute}; evaluation costs one forward pass, 2N + 4LHQT, at the same "
        "achieved FLOP/s",
        f"throughput: {e.throughput.note}",
    ]
    if stand_in:
        out.append(
            "the model is not in the model store, so tokens were counted with a small stand-in vocabulary: the "
            "model's own tokenizer usually needs fewer tokens (often 2-4x fewer for English), so tokens, time and "
            "points here are likely overestimates; import the model (`finetune models import`) for exact counts"
        )
    if p.gpus > 1:
        out.append(f"{p.gpus} GPUs keep the per-GPU throughput (data parallel, no loss to communication assumed)")
    if e.timing is not None:
        out += [
            f"training span (from the job's `start` event to its `end` event): the steps, {e.timing.evaluations} "
            f"evaluation(s) (every {p.eval_every or '-'} steps and after the last), {e.timing.checkpoints} "
            "checkpoint(s) (by steps, by time, and after the last step) and the final model",
            f"checkpoint: {a.checkpoint_fixed_s:g} s + trainable weights ({e.model.dtype}) and AdamW states written "
            f"at {a.storage_bytes_per_s / 1e9:g} GB/s; final model: {a.final_fixed_s:g} s + trainable weights",
            f"start-up allowance: {a.startup_gpu_s if e.device.is_gpu else a.startup_cpu_s:g} s fixed (scheduling, "
            f"processes, imports, DeepSpeed initialisation) + weights read at {a.load_bytes_per_s / 1e9:g} GB/s + "
            f"data preparation at {a.data_tokens_per_s:,.0f} tokens/s",
            "points = GPUs x wall time (start-up included, as the ledger counts held time) / 1800 s"
            if e.device.is_gpu
            else "a CPU run holds no GPU: no GPU-hours or points",
        ]
    out.append(
        f"memory: finetune.train.zero's estimate at ZeRO-{e.memory.zero_stage} against "
        f"{'the GPU data sheet' if e.device.is_gpu else 'this machine'}'s {e.memory.device_memory / 1e9:,.1f} GB, "
        "of which 90% may be used (CUDA context, buffers and fragmentation are not in the estimate)"
    )
    return out
