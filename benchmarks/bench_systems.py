"""The two systems a training benchmark times, on the same model folder, data and hyper-parameters.

* ``finetune``: our engine as ``finetune.train.run`` drives it (:func:`build_engine` then
  :func:`run_loop`), packed or padded as the recipe says; checkpoints are not written.
* ``hf-trainer``: ``transformers.Trainer`` configured the usual way: the same samples padded to
  the longest in each batch by ``DataCollatorForSeq2Seq``, SDPA attention, ``peft`` LoRA on every
  linear layer for LoRA, the default (fused) AdamW, the same cosine schedule with warm-up,
  micro batch, precision, clipping and gradient checkpointing; no checkpoints either.

Each step is timed from the end of the previous step to the end of this one (the data loading,
the forward and backward passes, the optimizer and the step's logging all fall inside), with the
GPU synchronised at each end. Tokens are real tokens only: padding is never counted.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Step:
    """One optimizer step as measured: when it ended, what it trained, its loss and gradient norm."""

    end: float
    tokens: int
    loss: float
    grad_norm: float


@dataclass
class Measured:
    """What one system's run gives the benchmark."""

    steps: list[Step]
    params: int  # N of finetune.flops (matrix-product parameters)
    layers: int
    query_width: int
    trainable: int
    peak_memory_bytes: int | None
    notes: dict[str, Any] = field(default_factory=dict)


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _release(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _start_memory(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(cuda: bool) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if cuda else None


class _StepSink:
    """A metrics sink for our loop that stamps each step's end (after a GPU synchronisation)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.steps: list[Step] = []

    def emit(self, event: Any) -> None:
        if event.kind == "step":
            _sync(self.cuda)
            self.steps.append(Step(time.perf_counter(), int(event.tokens), event.loss, event.grad_norm))

    def close(self) -> None:
        pass


def _trainable(model: torch.nn.Module) -> int:
    return sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in model.parameters() if p.requires_grad)


def run_finetune(recipe: Any, model_dir: Path, samples: Sequence[Any], pad_id: int) -> Measured:
    """Our engine on ``samples`` (packed first when the recipe packs), for the recipe's ``max_steps``."""
    from finetune.data.packing import pack
    from finetune.flops import shape_of
    from finetune.train.loop import Hooks, LoopState, run_loop
    from finetune.train.plan import plan_for
    from finetune.train.run import build_engine, close_process_group, init_process_group

    cuda = torch.cuda.is_available()
    seq_len = recipe.data.max_seq_len
    rows: Sequence[Any] = pack(samples, seq_len) if recipe.data.packing else samples
    plan = plan_for(recipe, rows=len(rows), tokens=sum(len(s) for s in samples), world_size=1)
    worker, created = init_process_group(cuda)
    engine: Any = None
    try:
        torch.manual_seed(recipe.training.seed)
        engine, stage, why = build_engine(recipe, model_dir, plan, worker, cuda)
        shape = shape_of(engine.module)
        sink = _StepSink(cuda)
        _release(cuda)
        _start_memory(cuda)
        _sync(cuda)
        sink.steps.append(Step(time.perf_counter(), 0, float("nan"), float("nan")))  # the clock's start
        run_loop(
            engine,
            plan,
            rows,
            [],
            pad_id=pad_id,
            worker=worker,
            sink=sink,
            hooks=Hooks(save=lambda _: None),
            state=LoopState(),
        )
        return Measured(
            steps=sink.steps,
            params=shape.params,
            layers=shape.layers,
            query_width=shape.query_width,
            trainable=_trainable(engine.module),
            peak_memory_bytes=_peak_memory(cuda),
            notes={
                "zero_stage": stage,
                "zero_reason": why,
                "rows": len(rows),
                "attention": getattr(engine.module.config, "_attn_implementation", None),
            },
        )
    finally:
        del engine
        close_process_group(created)
        _release(cuda)


class _CountingCollator:
    """``DataCollatorForSeq2Seq`` that also notes the real (unpadded) tokens of each batch it makes."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers import DataCollatorForSeq2Seq

        self.inner = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        self.tokens: list[int] = []
        self.padded: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.padded.append(int(batch["attention_mask"].numel()))
        return batch


class _Samples(torch.utils.data.Dataset):
    def __init__(self, samples: Sequence[Any]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        s = self.samples[i]
        return {"input_ids": list(s.input_ids), "labels": list(s.labels), "attention_mask": [1] * len(s.input_ids)}


def _step_clock(cuda: bool) -> Any:
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Stamps the end of every optimizer step, and the start of training."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(cuda)
            self.ends.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(cuda)
            self.ends.append(time.perf_counter())

    return StepClock()


def run_hf_trainer(recipe: Any, model_dir: Path, samples: Sequence[Any], out_dir: Path) -> Measured:
    """The Hugging Face Trainer, configured the usual way, on the same unpacked samples."""
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, Trainer, TrainingArguments

    from finetune.flops import shape_of
    from finetune.offline import LOAD_KWARGS
    from finetune.recipe import default_learning_rate

    cuda = torch.cuda.is_available()
    t, method = recipe.training, recipe.method
    bf16 = t.precision == "bf16" or (t.precision == "auto" and cuda)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **LOAD_KWARGS)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation="sdpa", **LOAD_KWARGS
    )
    model.config.use_cache = False
    if method.type == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=method.rank,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=1,
        learning_rate=default_learning_rate(recipe),
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps or 0,
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        max_steps=t.max_steps,
        seed=t.seed,
        bf16=bf16,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not cuda,
    )
    collator = _CountingCollator(tokenizer)
    clock = _step_clock(cuda)
    trainer = Trainer(
        model=model, args=args, train_dataset=_Samples(samples), data_collator=collator, callbacks=[clock]
    )
    trainer.remove_callback(PrinterCallback)  # the benchmark prints its own table
    shape = shape_of(model)
    try:
        _release(cuda)
        _start_memory(cuda)
        trainer.train()
        peak = _peak_memory(cuda)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    ends = clock.ends
    steps = [Step(ends[0], 0, float("nan"), float("nan"))]
    for i, log in enumerate(logs):
        steps.append(Step(ends[i + 1], collator.tokens[i], float(log["loss"]), float(log.get("grad_norm", "nan"))))
    padded = sum(collator.padded[: len(logs)])
    measured = Measured(
        steps=steps,
        params=shape.params,
        layers=shape.layers,
        query_width=shape.query_width,
        trainable=_trainable(model),
        peak_memory_bytes=peak,
        notes={
            "padding_share": round(1 - sum(s.tokens for s in steps) / max(padded, 1), 4),
            "optimizer": str(args.optim),
            "attention": "sdpa",
        },
    )
    del trainer, model
    _release(cuda)
    return measured
