"""ZeRO policy: memory estimates, stage choice, the DeepSpeed config (checked by DeepSpeed's own parser)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.errors import RecipeError
from finetune.recipe import Recipe
from finetune.train.zero import (
    FIT_FRACTION,
    GiB,
    MemoryEstimate,
    activation_bytes,
    choose_stage_for,
    choose_zero_stage,
    deepspeed_config,
    estimate_memory,
    oom_message,
    stage_estimator,
    weight_bytes_for,
)

GB = 10**9
H100 = 80 * GB
#: Llama-3.1-8B and Llama-3.3-70B shapes (config.json of the released models).
LLAMA_8B = {"params": 8_030_261_248, "hidden": 4096, "layers": 32, "vocab": 128_256}
LLAMA_70B = {"params": 70_553_706_496, "hidden": 8192, "layers": 80, "vocab": 128_256}


def _estimator(shape: dict[str, int], *, method: str, gpus: int, offload: str = "none", **kw: Any) -> Any:
    """estimate(stage) for a model shape, as the trainer binds it."""
    trainable = shape["params"] if method == "full" else shape["params"] // 200  # LoRA r=16: about 0.5%
    settings: dict[str, Any] = {
        "weight_bytes": 2,
        "grad_checkpointing": True,
        "micro_batch": 1,
        "seq_len": 2048,
    }
    settings.update(kw)
    return stage_estimator(
        params=shape["params"],
        trainable=trainable,
        gpus=gpus,
        offload=offload,
        hidden=shape["hidden"],
        layers=shape["layers"],
        vocab=shape["vocab"],
        **settings,
    )


# ------------------------------------------------------------------------------ estimates


def test_full_fine_tuning_in_bf16_costs_16_bytes_a_parameter_without_sharding() -> None:
    est = _estimator(LLAMA_8B, method="full", gpus=1)(stage=0)
    states = est.weights + est.gradients + est.optimizer
    assert states == pytest.approx(16 * LLAMA_8B["params"], rel=1e-6)  # 2 weights + 2 grads + 12 AdamW
    assert 125 * GB < states < 131 * GB  # the well-known ~128 GB of an 8B model
    assert est.total > H100  # does not fit one H100


def test_fp32_weights_are_their_own_master_copy() -> None:
    est = estimate_memory(
        params=1000,
        trainable=1000,
        gpus=1,
        stage=0,
        offload="none",
        weight_bytes=4,
        grad_checkpointing=True,
        micro_batch=1,
        seq_len=1,
        hidden=1,
        layers=1,
    )
    assert (est.weights, est.gradients, est.optimizer) == (4000, 4000, 8000)


def test_sharding_by_stage() -> None:
    estimate = _estimator(LLAMA_8B, method="full", gpus=4)
    p = LLAMA_8B["params"]
    s0, s2, s3 = estimate(stage=0), estimate(stage=2), estimate(stage=3)
    assert (s0.weights, s0.gradients, s0.optimizer) == (2 * p, 2 * p, 12 * p)
    assert (s2.weights, s2.gradients, s2.optimizer) == (2 * p, 2 * p // 4, 12 * p // 4)
    per_layer = 2 * p / LLAMA_8B["layers"]
    assert s3.weights == pytest.approx(2 * p / 4 + 2 * per_layer, rel=1e-6)  # shard + two gathered layers
    assert s3.activations == s0.activations


def test_offload_moves_optimizer_states_and_gradients_to_host_memory() -> None:
    estimate = _estimator(LLAMA_8B, method="full", gpus=2)
    plain = estimate(stage=2)
    moved = _estimator(LLAMA_8B, method="full", gpus=2, offload="optimizer")(stage=2)
    assert moved.optimizer == moved.gradients == 0
    assert moved.host == plain.optimizer + plain.gradients
    everything = _estimator(LLAMA_8B, method="full", gpus=2, offload="all")(stage=3)
    assert everything.weights == pytest.approx(2 * 2 * LLAMA_8B["params"] / LLAMA_8B["layers"])  # gathered layers
    assert everything.host > moved.host


def test_activations_follow_korthikanti_with_and_without_recomputation() -> None:
    shape = {"micro_batch": 1, "seq_len": 2048, "hidden": 4096, "layers": 32}
    sbh = 2048 * 4096
    assert activation_bytes(**shape, grad_checkpointing=False) == 34 * sbh * 32
    assert activation_bytes(**shape, grad_checkpointing=True) == 2 * sbh * 32 + 34 * sbh
    assert activation_bytes(**shape, grad_checkpointing=False, dtype_bytes=4) == 2 * 34 * sbh * 32
    # logits: 16-bit, fp32 copy, fp32 log-softmax
    assert (
        activation_bytes(**shape, grad_checkpointing=True, vocab=1000)
        - activation_bytes(**shape, grad_checkpointing=True)
        == 10 * 2048 * 1000
    )


def test_describe_names_every_part_in_gib() -> None:
    text = MemoryEstimate(GiB, 2 * GiB, 3 * GiB, 4 * GiB, host=5 * GiB).describe()
    assert text == (
        "weights 1.0 GiB, gradients 2.0 GiB, optimizer 3.0 GiB, activations 4.0 GiB: 10.0 GiB per GPU "
        "(+5.0 GiB host memory)"
    )


# ------------------------------------------------------------------------------ stage choice


def test_single_gpu_lora_gets_zero_0() -> None:
    stage, reason = choose_zero_stage(
        "auto", "lora", _estimator(LLAMA_8B, method="lora", gpus=1), gpu_memory_bytes=H100, gpus=1
    )
    assert stage == 0
    assert "nothing to shard" in reason


def test_lora_8b_on_two_gpus_gets_zero_2_never_3() -> None:
    stage, reason = choose_zero_stage(
        "auto", "lora", _estimator(LLAMA_8B, method="lora", gpus=2), gpu_memory_bytes=H100, gpus=2
    )
    assert stage == 2
    assert "ZeRO-2 for lora on 2 GPU(s)" in reason


def test_lora_70b_shards_weights_when_they_do_not_fit_one_gpu() -> None:
    stage, _ = choose_zero_stage(
        "auto", "lora", _estimator(LLAMA_70B, method="lora", gpus=4), gpu_memory_bytes=H100, gpus=4
    )
    assert stage == 3


def test_full_8b_on_one_h100_needs_offload() -> None:
    stage, reason = choose_zero_stage(
        "auto", "full", _estimator(LLAMA_8B, method="full", gpus=1), gpu_memory_bytes=H100, gpus=1
    )
    assert stage == 3
    assert "does not fit" in reason and "resources.offload optimizer" in reason
    stage, reason = choose_zero_stage(
        "auto",
        "full",
        _estimator(LLAMA_8B, method="full", gpus=1, offload="optimizer"),
        gpu_memory_bytes=H100,
        gpus=1,
        offload="optimizer",
    )
    assert stage == 2, reason


def test_full_8b_on_two_gpus_needs_zero_3_and_on_four_fits_zero_2() -> None:
    two = choose_zero_stage("auto", "full", _estimator(LLAMA_8B, method="full", gpus=2), gpu_memory_bytes=H100, gpus=2)
    four = choose_zero_stage("auto", "full", _estimator(LLAMA_8B, method="full", gpus=4), gpu_memory_bytes=H100, gpus=4)
    assert two[0] == 3 and four[0] == 2


def test_full_70b_on_four_gpus_needs_zero_3_with_offload() -> None:
    stage, reason = choose_zero_stage(
        "auto", "full", _estimator(LLAMA_70B, method="full", gpus=4), gpu_memory_bytes=H100, gpus=4
    )
    assert stage == 3 and "offload" in reason
    offloaded = _estimator(LLAMA_70B, method="full", gpus=4, offload="optimizer")
    assert choose_zero_stage("auto", "full", offloaded, gpu_memory_bytes=H100, gpus=4, offload="optimizer")[0] == 3
    assert offloaded(stage=3).total <= FIT_FRACTION * H100


def test_small_full_fine_tuning_on_several_gpus_prefers_zero_2_to_0() -> None:
    small = {"params": 1_235_814_400, "hidden": 2048, "layers": 16, "vocab": 128_256}
    stage, _ = choose_zero_stage(
        "auto", "full", _estimator(small, method="full", gpus=2), gpu_memory_bytes=H100, gpus=2
    )
    assert stage == 2


def test_pinned_stage_is_honoured_with_a_warning_when_it_will_not_fit() -> None:
    estimate = _estimator(LLAMA_8B, method="full", gpus=1)
    stage, reason = choose_zero_stage(0, "full", estimate, gpu_memory_bytes=H100, gpus=1)
    assert stage == 0
    assert "pinned" in reason and "warning" in reason and "out of memory" in reason
    stage, reason = choose_zero_stage(
        3, "lora", _estimator(LLAMA_8B, method="lora", gpus=2), gpu_memory_bytes=H100, gpus=2
    )
    assert (stage, reason) == (3, "ZeRO-3 pinned by resources.zero_stage")


def test_offload_decides_the_stage_it_needs() -> None:
    estimate = _estimator(LLAMA_8B, method="lora", gpus=1)
    assert choose_zero_stage("auto", "lora", estimate, gpu_memory_bytes=H100, gpus=1, offload="all")[0] == 3
    assert choose_zero_stage("auto", "lora", estimate, gpu_memory_bytes=None, gpus=1, offload="optimizer")[0] == 2


@pytest.mark.parametrize(("stage", "offload"), [(0, "optimizer"), (0, "all"), (2, "all")])
def test_pinned_stage_that_cannot_offload_is_a_located_recipe_error(stage: int, offload: str) -> None:
    with pytest.raises(RecipeError) as err:
        choose_zero_stage(stage, "full", _estimator(LLAMA_8B, method="full", gpus=2), gpu_memory_bytes=H100, gpus=2,
                          offload=offload)  # fmt: skip
    assert err.value.issues[0].path == "resources.offload"


def test_cpu_runs_shard_only_across_several_processes() -> None:
    estimate = _estimator(LLAMA_8B, method="lora", gpus=1)
    assert choose_zero_stage("auto", "lora", estimate, gpu_memory_bytes=None, gpus=1)[0] == 0
    assert choose_zero_stage("auto", "full", estimate, gpu_memory_bytes=None, gpus=2)[0] == 2
    assert choose_zero_stage(3, "full", estimate, gpu_memory_bytes=None, gpus=2)[0] == 3


def test_weight_bytes_per_method() -> None:
    assert weight_bytes_for("full", bf16=True) == weight_bytes_for("lora", bf16=True) == 2
    assert weight_bytes_for("full", bf16=False) == 4
    assert 0.5 < weight_bytes_for("qlora", bf16=True) < 0.53  # NF4 plus double-quantised scales


def test_choose_stage_for_reads_the_built_model(tiny_llama: Path) -> None:
    from finetune.train.model import build_model

    recipe = Recipe.model_validate(
        {"model": {"id": "llama-3.2-1b-instruct", "tiny": True}, "data": {"path": "train.jsonl"}}
    )
    model = build_model(recipe, tiny_llama, cuda=False)
    assert choose_stage_for(recipe, model, world_size=1, cuda=False, seq_len=64)[0] == 0
    assert choose_stage_for(recipe, model, world_size=2, cuda=False, seq_len=64)[0] == 2
    stage, reason = choose_stage_for(recipe, model, world_size=2, cuda=True, seq_len=64, gpu_memory_bytes=H100)
    assert stage == 2 and "ZeRO-2 for lora on 2 GPU(s)" in reason
    stage, reason = choose_stage_for(recipe, model, world_size=1, cuda=True, seq_len=64, gpu_memory_bytes=10**6)
    assert stage == 3 and "does not fit" in reason


# ------------------------------------------------------------------------------ DeepSpeed config


def _config(**kw: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "stage": 2,
        "offload": "none",
        "micro_batch": 4,
        "grad_accum": 8,
        "max_grad_norm": 1.0,
        "lr": 2e-4,
        "weight_decay": 0.01,
        "bf16": True,
        "cuda": True,
    }
    settings.update(kw)
    return deepspeed_config(**settings)


CONFIG_CASES = [
    {"stage": s, "offload": o, "cuda": c, "bf16": b}
    for s, o in [(0, "none"), (2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "all")]
    for c in (True, False)
    for b in (True, False)
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_config_is_accepted_by_deepspeeds_parser(case: dict[str, Any]) -> None:
    from deepspeed.runtime import constants
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    cfg = _config(**case)
    known = {v for v in vars(constants).values() if isinstance(v, str)} | {ZERO_OPTIMIZATION}
    assert set(cfg) <= known
    parsed = DeepSpeedConfig(cfg)  # pydantic models with extra="forbid": unknown keys fail here
    assert parsed.train_micro_batch_size_per_gpu == 4
    assert parsed.gradient_accumulation_steps == 8
    assert parsed.train_batch_size == 32  # world size 1 outside a process group
    assert parsed.gradient_clipping == 1.0
    assert parsed.zero_optimization_stage == case["stage"]
    assert parsed.bfloat16_config.enabled is case["bf16"]
    assert parsed.optimizer_name == "adamw"
    assert parsed.scheduler_name is None  # our loop drives the learning rate
    assert parsed.wall_clock_breakdown is False
    zero = parsed.zero_config
    offloaded = case["cuda"] and case["offload"] != "none"
    assert (zero.offload_optimizer is not None) is offloaded
    assert (zero.offload_param is not None) is (case["cuda"] and case["offload"] == "all")
    if offloaded:
        assert zero.offload_optimizer.device == "cpu" and zero.offload_optimizer.pin_memory
    if case["stage"] == 3:
        assert zero.gather_16bit_weights_on_model_save
        assert zero.overlap_comm is case["cuda"]


def test_optimizer_is_fused_adam_on_cuda_and_torch_adamw_on_cpu() -> None:
    from deepspeed.runtime.config import ADAMW_OPTIMIZER, TORCH_ADAM_PARAM

    for cuda in (True, False):
        optimizer = _config(cuda=cuda)["optimizer"]
        assert optimizer["type"].lower() == ADAMW_OPTIMIZER
        assert optimizer["params"][TORCH_ADAM_PARAM] is (not cuda)
        assert optimizer["params"] | {TORCH_ADAM_PARAM: None} == {
            "lr": 2e-4,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 0.01,
            TORCH_ADAM_PARAM: None,
        }


def test_config_refuses_offload_the_stage_cannot_run() -> None:
    with pytest.raises(ValueError, match="needs ZeRO stage 3"):
        _config(stage=2, offload="all")
    with pytest.raises(ValueError, match="offload must be one of"):
        _config(offload="gpu")


# ------------------------------------------------------------------------------ out of memory


def test_oom_message_names_the_knobs_next_thing_first() -> None:
    text = oom_message(stage=2, micro_batch=4, grad_checkpointing=False, offload="none")
    assert text.startswith("out of GPU memory (micro batch 4, gradient checkpointing off, ZeRO stage 2, offload none)")
    order = [
        "reduce training.micro_batch_size (now 4",
        "turn on training.gradient_checkpointing",
        "use resources.zero_stage 3 (now 2)",
        "set resources.offload optimizer",
    ]
    positions = [text.index(knob) for knob in order]
    assert positions == sorted(positions)


def test_oom_message_skips_knobs_already_turned() -> None:
    text = oom_message(stage=3, micro_batch=1, grad_checkpointing=True, offload="optimizer")
    assert "micro_batch_size" not in text.split("Try")[1]
    assert "turn on" not in text and "zero_stage 3" not in text
    assert "set resources.offload all" in text
    assert "max_seq_len" in text


# ------------------------------------------------------------------------------ DeepSpeed engine


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    """A one-process gloo group, as each Ray worker has (reused when one exists already)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    if dist.is_initialized():
        yield
        return
    groups._WORLD_GROUP = None  # DeepSpeed's clone of an earlier, destroyed world group is stale
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**env, "LOCAL_WORLD_SIZE": "1"}.items():
            mp.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        dist.destroy_process_group()
        groups._WORLD_GROUP = None


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.loading import ensure_tiny
    from finetune.registry import Registry
    from finetune.settings import get_settings

    return ensure_tiny(
        Registry.load(get_settings().registry), "llama-3.2-1b-instruct", tmp_path_factory.mktemp("store")
    )


@pytest.mark.integration
@pytest.mark.parametrize(("stage", "method"), [(0, "lora"), (2, "lora"), (3, "full")])
def test_deepspeed_trains_a_tiny_model(process_group: None, tiny_llama: Path, stage: int, method: str) -> None:
    import deepspeed

    from finetune.train.model import build_model, count_parameters

    recipe = Recipe.model_validate(
        {
            "model": {"id": "llama-3.2-1b-instruct", "tiny": True},
            "data": {"path": "train.jsonl"},
            "method": {"type": method},
        }
    )
    cfg = deepspeed_config(
        stage=stage, offload="none", micro_batch=2, grad_accum=1, max_grad_norm=1.0, lr=1e-2, weight_decay=0.0,
        bf16=False, cuda=False,
    )  # fmt: skip
    model = build_model(recipe, tiny_llama, cuda=False, zero3_config=cfg if stage == 3 else None)
    total, trainable = count_parameters(model)
    if stage == 3:  # loaded partitioned: ZeRO-3 holds the parameters, counted whole all the same
        assert all(hasattr(p, "ds_numel") for p in model.parameters())
        assert total == trainable > 100_000
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg
    )
    assert isinstance(engine.basic_optimizer, torch.optim.AdamW)
    assert engine.zero_optimization_stage() == stage
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):  # loss before, after one and after two optimizer steps
        out = engine(input_ids=ids, labels=ids, use_cache=False)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    assert losses[0] > losses[1] > losses[2], losses
    assert engine.global_steps == 3
