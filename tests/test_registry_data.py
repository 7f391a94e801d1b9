"""Checks on the real model_registry.yaml: it loads, its chat templates close every assistant turn
with the model's end-of-turn token, its architectures build Hugging Face configs that keep the
numbers written, and the tricky origin cases come out right.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils.chat_template_utils import render_jinja_template

from finetune.origin import Decision, judge
from finetune.registry import ModelEntry, Registry, Status

REGISTRY_PATH = Path(__file__).resolve().parents[1] / "model_registry.yaml"

# What each template emits to open an assistant turn: the end of a generation prompt, and what
# precedes every assistant answer (up to whitespace).
ASSISTANT_HEADER = {
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama31": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<start_of_turn>model\n",
    "mistral": "[/INST]",
    "mistral_tekken": "[/INST]",
    "breeze": " [/INST] ",
    "phi3": "<|assistant|>\n",
    "phi4mini": "<|assistant|>",
    "phi4": "<|im_start|>assistant<|im_sep|>",
    "granite": "<|start_of_role|>assistant<|end_of_role|>",
    "olmo2": "<|assistant|>\n",
    "chatml": "<|im_start|>assistant\n",
    "falcon3": "<|assistant|>\n",
}

SYSTEM = "You answer in Traditional Chinese. 系統提示"
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "第一個問題是什麼？"},
    {"role": "assistant", "content": "FIRST-ANSWER 第一個答案"},
    {"role": "user", "content": "And the second question?"},
    {"role": "assistant", "content": "SECOND-ANSWER 第二個答案"},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load(REGISTRY_PATH)


def _all_entries() -> list[ModelEntry]:
    """Entries for parametrizing; a registry that does not load fails test_registry_loads instead."""
    try:
        return list(Registry.load(REGISTRY_PATH))
    except Exception:
        return []


APPROVED = [e for e in _all_entries() if e.status is Status.APPROVED]
WITH_ARCHITECTURE = [e for e in _all_entries() if e.architecture is not None]


def _ids(entries: list[ModelEntry]) -> list[str]:
    return [e.id for e in entries]


# ------------------------------------------------------------------------------------------ rendering
def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
_ENV.globals["raise_exception"] = _raise_exception


def render(registry: Registry, entry: ModelEntry, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Render like Hugging Face's apply_chat_template, with the entry's own special tokens."""
    assert entry.chat is not None
    template = _ENV.from_string(registry.chat_template(entry))
    return template.render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=entry.chat.bos or "",
        eos_token=entry.chat.eos,
    )


# ------------------------------------------------------------------------------------------ the file
def test_registry_loads_with_enough_entries(registry: Registry) -> None:
    assert len(registry.by_status(Status.APPROVED)) >= 15
    assert len(registry.by_status(Status.DENIED)) >= 10
    assert registry.by_status(Status.PENDING)


def test_every_template_is_known_to_these_tests_and_used(registry: Registry) -> None:
    assert set(registry.templates) == set(ASSISTANT_HEADER)
    used = {e.chat.template for e in registry if e.chat is not None}
    assert used == set(registry.templates)


def test_approved_entries_are_complete(registry: Registry) -> None:
    for entry in registry.by_status(Status.APPROVED):
        assert entry.developer.country != "CN", entry.id
        parts = {c.part for c in entry.components}
        assert {"base_weights", "tokenizer"} <= parts, entry.id
        assert entry.license, entry.id
        assert entry.params_b, entry.id
        assert entry.chat is not None and entry.chat.eot in entry.chat.special_tokens()
        if entry.params_b and entry.params_b >= 60:
            assert set(entry.methods) == {"lora", "qlora"}, entry.id
        else:
            assert set(entry.methods) == {"full", "lora", "qlora"}, entry.id


def test_denied_entries_are_of_prc_origin(registry: Registry) -> None:
    for entry in registry.by_status(Status.DENIED):
        assert entry.developer.country == "CN", entry.id
        assert entry.reason, entry.id


def test_no_approved_model_lives_under_a_denied_repository(registry: Registry) -> None:
    for entry in registry.by_status(Status.APPROVED):
        assert not registry.denied_sources(entry.all_repos()), entry.id
        assert not registry.denied_sources(entry.lineage), entry.id


# ------------------------------------------------------------------------------------------ templates
@pytest.mark.parametrize("entry", APPROVED, ids=_ids(APPROVED))
def test_template_closes_every_assistant_turn_with_eot(registry: Registry, entry: ModelEntry) -> None:
    assert entry.chat is not None
    header, eot = ASSISTANT_HEADER[entry.chat.template], entry.chat.eot
    text = render(registry, entry, CONVERSATION, add_generation_prompt=False)

    for answer in ANSWERS:
        closed = re.escape(header.strip()) + r"\s*" + re.escape(answer) + re.escape(eot)
        assert re.search(closed, text), f"{entry.id}: '{answer}' is not opened by the header and closed by {eot}"
    assert text.count(eot) >= len(ANSWERS)
    assert SYSTEM in text, f"{entry.id}: the system prompt was dropped"
    if "bos_token" in registry.chat_template(entry):
        assert entry.chat.bos and text.startswith(entry.chat.bos), f"{entry.id}: text does not start with bos"


@pytest.mark.parametrize("entry", APPROVED, ids=_ids(APPROVED))
def test_generation_prompt_ends_with_the_assistant_header(registry: Registry, entry: ModelEntry) -> None:
    assert entry.chat is not None
    header = ASSISTANT_HEADER[entry.chat.template]
    prompt = render(registry, entry, CONVERSATION[:-1], add_generation_prompt=True)
    assert prompt.endswith(header), f"{entry.id}: generation prompt ends with {prompt[-40:]!r}"
    # What the model sees at inference is exactly what preceded the last answer in training.
    full = render(registry, entry, CONVERSATION, add_generation_prompt=False)
    assert full.startswith(prompt), f"{entry.id}: the generation prompt is not a prefix of the trained text"
    assert full[len(prompt) :].lstrip().startswith(ANSWERS[-1])


@pytest.mark.parametrize("entry", APPROVED, ids=_ids(APPROVED))
def test_template_works_without_a_system_prompt(registry: Registry, entry: ModelEntry) -> None:
    assert entry.chat is not None
    text = render(registry, entry, CONVERSATION[1:], add_generation_prompt=False)
    for answer in ANSWERS:
        assert answer + entry.chat.eot in text, entry.id


@pytest.mark.parametrize("entry", APPROVED, ids=_ids(APPROVED))
def test_template_refuses_unknown_roles(registry: Registry, entry: ModelEntry) -> None:
    messages = [*CONVERSATION[:3], {"role": "tool", "content": "{}"}]
    with pytest.raises(jinja2.exceptions.TemplateError):
        render(registry, entry, messages, add_generation_prompt=False)


@pytest.mark.parametrize("entry", APPROVED, ids=_ids(APPROVED))
def test_transformers_renders_the_same_text(registry: Registry, entry: ModelEntry) -> None:
    assert entry.chat is not None
    rendered, _ = render_jinja_template(
        conversations=[CONVERSATION],
        chat_template=registry.chat_template(entry),
        add_generation_prompt=False,
        bos_token=entry.chat.bos or "",
        eos_token=entry.chat.eos,
    )
    assert rendered[0] == render(registry, entry, CONVERSATION, add_generation_prompt=False)


# ------------------------------------------------------------------------------------------ architectures
def _rope_values(config: Any) -> tuple[set[float], dict[str, Any]]:
    """Every rope theta the config carries, and its rope-scaling settings, in transformers 4 or 5."""
    thetas: set[float] = set()
    scaling: dict[str, Any] = {}
    for name in ("rope_theta", "rope_local_base_freq"):
        if isinstance(getattr(config, name, None), int | float):
            thetas.add(float(getattr(config, name)))
    params = getattr(config, "rope_parameters", None) or {}
    blocks = [params] if "rope_theta" in params or "rope_type" in params else list(params.values())
    for block in blocks:
        if isinstance(block, dict):
            if "rope_theta" in block:
                thetas.add(float(block["rope_theta"]))
            scaling.update({k: v for k, v in block.items() if k != "rope_theta"})
    scaling.update(getattr(config, "rope_scaling", None) or {})
    return thetas, scaling


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


ROPE_KEYS = {"rope_theta", "rope_scaling", "rope_local_base_freq"}


@pytest.mark.parametrize("entry", WITH_ARCHITECTURE, ids=_ids(WITH_ARCHITECTURE))
def test_architecture_builds_a_config_that_keeps_the_numbers(entry: ModelEntry) -> None:
    assert entry.architecture is not None
    arch = entry.config_kwargs()
    # YAML 1.1 reads 5e5 (no dot) as a string; numbers must be written 500000.0 or 5.0e+5.
    for key, value in arch.items():
        assert not (isinstance(value, str) and _is_number(value)), f"{entry.id}: {key} is the string {value!r}"
    config = AutoConfig.for_model(**copy.deepcopy(arch))

    assert config.model_type == arch["model_type"]
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "max_position_embeddings"):
        assert getattr(config, key) == arch[key], f"{entry.id}: {key}"
    for key, value in arch.items():
        if key in ROPE_KEYS or key == "model_type":
            continue
        assert getattr(config, key, None) == value, (
            f"{entry.id}: {key} is {getattr(config, key, None)!r}, not {value!r}"
        )

    thetas, scaling = _rope_values(config)
    assert "rope_theta" in arch, f"{entry.id}: write rope_theta explicitly (transformers defaults differ)"
    assert float(arch["rope_theta"]) in thetas, f"{entry.id}: rope theta {arch['rope_theta']} lost, got {thetas}"
    if "rope_local_base_freq" in arch:
        assert float(arch["rope_local_base_freq"]) in thetas, entry.id
    for key, value in (arch.get("rope_scaling") or {}).items():
        assert scaling.get(key) == value, f"{entry.id}: rope scaling {key}"
    assert entry.architecture == arch, f"{entry.id}: building the config changed the registry entry"


@pytest.mark.parametrize("entry", WITH_ARCHITECTURE, ids=_ids(WITH_ARCHITECTURE))
def test_architecture_matches_the_published_parameter_count(entry: ModelEntry) -> None:
    """Build the model on the meta device (no memory) and count: catches a wrong layer count or width."""
    assert entry.architecture is not None and entry.params_b is not None
    config = AutoConfig.for_model(**entry.config_kwargs())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(entry.params_b, rel=0.02), f"{entry.id}: architecture gives {billions:.3f}B"


def test_llama31_rope_scaling_is_llama3_type(registry: Registry) -> None:
    for entry in registry.by_status(Status.APPROVED):
        assert entry.architecture is not None
        if entry.architecture["model_type"] == "llama" and entry.architecture["max_position_embeddings"] == 131072:
            scaling = entry.architecture["rope_scaling"]
            assert scaling["rope_type"] == "llama3" and scaling["original_max_position_embeddings"] == 8192
            assert scaling["low_freq_factor"] == 1.0 and scaling["high_freq_factor"] == 4.0


# ------------------------------------------------------------------------------------------ origin
def _decision(registry: Registry, model_id: str) -> tuple[ModelEntry, Decision, Decision]:
    """The entry, the registry verdict and the verdict of its recorded facts alone."""
    entry = registry.get(model_id)
    assert entry is not None, model_id
    return entry, registry.verdict(entry).decision, judge(registry.facts(entry)).decision


@pytest.mark.parametrize(
    "model_id", ["yi-1.5-34b", "yi-1.5-9b", "deepseek-r1-distill-llama-8b", "deepseek-r1-distill-llama-70b"]
)
def test_prc_models_declaring_llama_are_denied(registry: Registry, model_id: str) -> None:
    entry, decision, by_facts = _decision(registry, model_id)
    assert entry.model_type == "llama" and entry.status is Status.DENIED
    assert decision is Decision.DENY and by_facts is Decision.DENY


def test_yi_signature(registry: Registry) -> None:
    for model_id in ("yi-1.5-34b", "yi-1.5-9b"):
        entry = registry.get(model_id)
        assert entry is not None and entry.architecture is not None
        assert entry.architecture["vocab_size"] == 64000 and entry.architecture["rope_theta"] == 5e6


@pytest.mark.parametrize(
    "model_id", ["taide-llama3-8b-chat-alpha1", "taide-llama3.1-8b-chat", "llama-3-taiwan-8b-instruct"]
)
def test_taiwanese_llama_models_are_allowed(registry: Registry, model_id: str) -> None:
    entry, decision, _ = _decision(registry, model_id)
    assert entry.model_type == "llama" and entry.developer.country == "TW"
    assert decision is Decision.ALLOW
    assert entry.status is Status.APPROVED
    meta = {c.part: c.entity for c in entry.components}
    assert meta["base_weights"] == meta["tokenizer"] == "Meta Platforms"


@pytest.mark.parametrize("model_id", ["llama-breeze2-8b-instruct", "r1-1776", "mai-ds-r1"])
def test_components_or_lineage_of_prc_origin_go_to_review(registry: Registry, model_id: str) -> None:
    entry, decision, by_facts = _decision(registry, model_id)
    assert entry.status is Status.PENDING and entry.developer.country != "CN"
    assert decision is Decision.REVIEW
    assert by_facts is Decision.REVIEW, f"{model_id}: the recorded facts alone should send it to review"


def test_breeze2_vision_encoder_is_recorded(registry: Registry) -> None:
    entry = registry.get("llama-breeze2-8b-instruct")
    assert entry is not None
    vision = [c for c in entry.components if c.part == "vision_encoder"]
    assert vision and vision[0].country == "CN"


def test_qwen_repository_finds_a_denied_family(registry: Registry) -> None:
    found = registry.find_repo("Qwen/Qwen2.5-7B-Instruct")
    assert any(e.kind == "family" and e.status is Status.DENIED for e in found)
    distill = registry.find_repo("deepseek-ai/DeepSeek-R1-Distill-Llama-8B")
    assert {e.id for e in distill} >= {"deepseek-r1-distill-llama-8b", "deepseek-family"}
    assert all(e.status is Status.DENIED for e in distill)


def test_approved_repositories_are_found_by_repo(registry: Registry) -> None:
    found = registry.find_repo("meta-llama/Llama-3.2-1B-Instruct")
    assert [e.id for e in found] == ["llama-3.2-1b-instruct"]
    assert not registry.find_repo("meta-llama/Llama-3.2-1B-Instruct-not-a-model")
