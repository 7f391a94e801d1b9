"""Building the trained model: precision, full / LoRA / DoRA / QLoRA, targets per family, counts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.errors import RecipeError
from finetune.loading import ensure_tiny
from finetune.recipe import Recipe
from finetune.registry import Registry
from finetune.settings import get_settings
from finetune.train.model import (
    MethodUnavailableError,
    attention_implementation,
    build_model,
    check_method_available,
    count_parameters,
    quantization_config,
    resolve_precision,
)

ATTENTION_MLP = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
#: The linear projections of each family, as LoRA should adapt them (Phi-3 fuses qkv and gate/up).
FAMILY_TARGETS = {
    "llama-3.2-1b-instruct": ATTENTION_MLP,
    "gemma-2-2b-it": ATTENTION_MLP,
    "gemma-3-1b-it": ATTENTION_MLP,
    "mistral-7b-instruct-v0.3": ATTENTION_MLP,
    "phi-3.5-mini-instruct": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "granite-3.1-2b-instruct": ATTENTION_MLP,
    "olmo-2-1124-7b-instruct": ATTENTION_MLP,
}


def recipe(model_id: str = "llama-3.2-1b-instruct", method: str = "lora", **sections: Any) -> Recipe:
    body: dict[str, Any] = {
        "model": {"id": model_id, "tiny": True},
        "data": {"path": "train.jsonl"},
        "method": {"type": method},
    }
    for name, values in sections.items():
        body.setdefault(name, {}).update(values)
    return Recipe.model_validate(body)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load(get_settings().registry)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


def tiny(registry: Registry, store: Path, model_id: str = "llama-3.2-1b-instruct") -> Path:
    return ensure_tiny(registry, model_id, store)


def adapted_modules(model: torch.nn.Module) -> set[str]:
    """Full paths of the modules that carry a LoRA adapter."""
    return {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}


# ------------------------------------------------------------------------------ precision


@pytest.mark.parametrize(
    ("precision", "cuda", "dtype"),
    [
        ("auto", True, torch.bfloat16),
        ("auto", False, torch.float32),
        ("fp32", True, torch.float32),
        ("bf16", True, torch.bfloat16),
        ("bf16", False, torch.bfloat16),
        ("fp32", False, torch.float32),
    ],
)
def test_precision(precision: str, cuda: bool, dtype: torch.dtype) -> None:
    assert resolve_precision(recipe(training={"precision": precision}), cuda) is dtype


def test_bf16_on_cpu_is_honoured_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="finetune.train.model"):
        resolve_precision(recipe(training={"precision": "bf16"}), cuda=False)
    assert "bf16 on CPU" in caplog.text


# ------------------------------------------------------------------------------ methods


def test_full_fine_tuning_trains_every_parameter(registry: Registry, store: Path) -> None:
    model = build_model(recipe(method="full"), tiny(registry, store), cuda=False)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    total, trainable = count_parameters(model)
    assert total == trainable == sum(p.numel() for p in model.parameters())
    assert model.config.use_cache is False
    assert model.training


@pytest.mark.parametrize("model_id", sorted(FAMILY_TARGETS))
def test_lora_adapts_every_linear_projection_of_the_family(registry: Registry, store: Path, model_id: str) -> None:
    model = build_model(recipe(model_id), tiny(registry, store, model_id), cuda=False)
    adapted = adapted_modules(model)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == FAMILY_TARGETS[model_id]
    assert all(".layers." in name for name in adapted)  # never the LM head or the embeddings
    assert not any("lm_head" in name or "embed" in name for name in adapted)
    layers = model.get_base_model().config.num_hidden_layers
    assert len(adapted) == layers * len(FAMILY_TARGETS[model_id])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    total, n_trainable = count_parameters(model)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) < total
    assert model.peft_config["default"].r == 16 and model.peft_config["default"].lora_alpha == 32


def test_lora_rank_alpha_dropout_come_from_the_recipe(registry: Registry, store: Path) -> None:
    method = {"type": "lora", "rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    model = build_model(_with_method(method), tiny(registry, store), cuda=False)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert {name.rsplit(".", 1)[-1] for name in adapted_modules(model)} == {"q_proj", "v_proj"}


def _with_method(method: dict[str, Any]) -> Recipe:
    return Recipe.model_validate(
        {"model": {"id": "llama-3.2-1b-instruct", "tiny": True}, "data": {"path": "train.jsonl"}, "method": method}
    )


def test_unknown_target_module_is_a_located_error(registry: Registry, store: Path) -> None:
    with pytest.raises(RecipeError) as err:
        build_model(_with_method({"type": "lora", "target_modules": ["query_key_value"]}), tiny(registry, store),
                    cuda=False)  # fmt: skip
    issue = err.value.issues[0]
    assert issue.path == "method.target_modules"
    assert "query_key_value" in issue.message and issue.hint is not None and "q_proj" in issue.hint


def test_dora_adds_trainable_magnitude_vectors(registry: Registry, store: Path) -> None:
    plain = build_model(recipe(), tiny(registry, store), cuda=False)
    dora = build_model(_with_method({"type": "lora", "dora": True}), tiny(registry, store), cuda=False)
    magnitudes = [n for n, p in dora.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert len(magnitudes) == len(adapted_modules(dora))
    assert not any("lora_magnitude_vector" in n for n, _ in plain.named_parameters())
    assert count_parameters(dora)[1] > count_parameters(plain)[1]


def test_gradient_checkpointing_switch_and_gradients_reach_the_adapters(registry: Registry, store: Path) -> None:
    on = build_model(recipe(training={"gradient_checkpointing": True}), tiny(registry, store), cuda=False)
    off = build_model(recipe(training={"gradient_checkpointing": False}), tiny(registry, store), cuda=False)
    assert on.get_base_model().model.gradient_checkpointing is True
    assert off.get_base_model().model.gradient_checkpointing is False
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    on(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = [p.grad for n, p in on.named_parameters() if "lora_B" in n]  # lora_A's are 0: B starts at 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_attention_keeps_packed_documents_apart(registry: Registry, store: Path) -> None:
    gemma2 = build_model(recipe("gemma-2-2b-it"), tiny(registry, store, "gemma-2-2b-it"), cuda=False)
    llama = build_model(recipe(), tiny(registry, store), cuda=False)
    assert gemma2.get_base_model().config._attn_implementation == "eager"  # soft-capping: SDPA cannot
    assert llama.get_base_model().config._attn_implementation == "sdpa"
    forced = build_model(recipe(), tiny(registry, store), cuda=False, attn_implementation="eager")
    assert forced.get_base_model().config._attn_implementation == "eager"


def test_attention_choice_on_cuda_without_packing() -> None:
    class Config:
        attn_logit_softcapping: float | None = None

    capped = Config()
    capped.attn_logit_softcapping = 50.0
    assert attention_implementation(Config(), cuda=True, packing=False) == "sdpa"
    assert attention_implementation(capped, cuda=True, packing=False) == "flex_attention"
    assert attention_implementation(capped, cuda=False, packing=False) == "eager"
    assert attention_implementation(capped, cuda=True, packing=True) == "flex_attention"


# ------------------------------------------------------------------------------ QLoRA


def test_qlora_on_cpu_fails_clearly_before_loading_anything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transformers

    loads: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        loads.append(args)
        raise AssertionError("nothing may be loaded for a job that cannot run")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    with pytest.raises(MethodUnavailableError, match="QLoRA needs a CUDA GPU") as err:
        build_model(recipe(method="qlora"), tmp_path / "never-read", cuda=False)
    assert "method 'lora'" in str(err.value)
    assert loads == []


def test_qlora_without_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(MethodUnavailableError, match=r"pip install 'finetune\[gpu\]'"):
        check_method_available(recipe(method="qlora"), cuda=True)
    check_method_available(recipe(method="lora"), cuda=False)  # other methods run anywhere


def test_qlora_quantisation_settings_come_from_the_recipe() -> None:
    method = _with_method({"type": "qlora", "quant_type": "fp4", "double_quant": False}).method
    config = quantization_config(method, torch.bfloat16)
    assert config.load_in_4bit and not config.load_in_8bit
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("fp4", False)
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


# ------------------------------------------------------------------------------ counting


def test_count_parameters_reads_zero3_partitioned_sizes() -> None:
    module = torch.nn.Module()
    module.partitioned = torch.nn.Parameter(torch.empty(0))
    module.partitioned.ds_numel = 1000  # type: ignore[attr-defined]
    module.frozen = torch.nn.Parameter(torch.zeros(10), requires_grad=False)
    assert count_parameters(module) == (1010, 1000)
