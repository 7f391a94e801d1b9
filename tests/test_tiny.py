"""Tiny random-weight models: every approved registry entry builds, loads offline and chats."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import jinja2
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.errors import FinetuneError
from finetune.offline import LOAD_KWARGS
from finetune.registry import ChatSpec, ModelEntry, Registry, Status
from finetune.tiny import TINY_HEADS, build_tokenizer, materialize_tiny, tiny_config

REGISTRY_PATH = Path(__file__).resolve().parents[1] / "model_registry.yaml"
MIXED_TEXT = "繁體中文 简体中文 emoji 🚀 mixed"
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. 請用繁體中文回答。"},
    {"role": "user", "content": "Hello! 你好 🚀"},
    {"role": "assistant", "content": "Hi, how can I help? 有什麼可以幫忙的嗎？"},
]


def _load_registry() -> Registry | None:
    """The real registry, or None while the file is not written yet (then those tests skip)."""
    if not REGISTRY_PATH.exists() or not REGISTRY_PATH.read_text(encoding="utf-8").strip():
        return None
    return Registry.load(REGISTRY_PATH)


REGISTRY = _load_registry()
APPROVED = [] if REGISTRY is None else [e.id for e in REGISTRY.by_status(Status.APPROVED)]
needs_registry = pytest.mark.skipif(REGISTRY is None, reason=f"{REGISTRY_PATH.name} is not written yet")
per_entry = pytest.mark.parametrize("entry_id", APPROVED or [pytest.param("none", marks=needs_registry)])


def _entry(entry_id: str) -> ModelEntry:
    assert REGISTRY is not None
    entry = REGISTRY.get(entry_id)
    assert entry is not None
    return entry


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Materialised tiny models by entry id, built once per module."""
    return {}


@pytest.fixture
def tiny_dir(entry_id: str, tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    if entry_id not in tiny_dirs:
        entry = _entry(entry_id)
        assert REGISTRY is not None
        dest = tmp_path_factory.mktemp("tiny") / entry_id
        tiny_dirs[entry_id] = materialize_tiny(entry, REGISTRY.chat_template(entry), dest)
    return tiny_dirs[entry_id]


def _render(tokenizer: Any, conversation: list[dict[str, str]]) -> list[int]:
    """Chat ids of a conversation; a template that refuses a system turn gets it folded into the user turn."""
    try:
        return list(tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"])
    except jinja2.TemplateError:
        system, user, *rest = conversation
        folded = {"role": "user", "content": f"{system['content']}\n\n{user['content']}"}
        return list(tokenizer.apply_chat_template([folded, *rest], tokenize=True)["input_ids"])


# --------------------------------------------------------------------------- every approved entry


@needs_registry
def test_registry_covers_the_required_families() -> None:
    assert REGISTRY is not None
    types = {e.model_type for e in REGISTRY.by_status(Status.APPROVED)}
    assert {"llama", "mistral", "phi3"} <= types
    assert types & {"gemma2", "gemma3_text"}


@per_entry
def test_loads_offline_and_runs_forward(tiny_dir: Path, no_network: None) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, **LOAD_KWARGS, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, **LOAD_KWARGS)
    ids = tokenizer("Hello, 世界!", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert model.config.vocab_size == len(tokenizer)
    assert torch.isfinite(logits).all()


@per_entry
def test_chat_template_and_special_tokens(entry_id: str, tiny_dir: Path, no_network: None) -> None:
    chat = _entry(entry_id).chat
    assert chat is not None
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, **LOAD_KWARGS)
    ids = _render(tokenizer, CONVERSATION)
    eot_id = tokenizer.convert_tokens_to_ids(chat.eot)
    assert eot_id in ids
    if chat.bos:
        bos_id = tokenizer.convert_tokens_to_ids(chat.bos)
        assert ids[:2] != [bos_id, bos_id], "chat rendering must not double the bos token"
    for token in chat.special_tokens():
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    assert tokenizer.decode(tokenizer.encode(MIXED_TEXT, add_special_tokens=False)) == MIXED_TEXT
    assert tokenizer.decode(tokenizer.encode(MIXED_TEXT), skip_special_tokens=True) == MIXED_TEXT


@per_entry
def test_folder_is_safe_and_stops_on_end_of_turn(entry_id: str, tiny_dir: Path) -> None:
    chat = _entry(entry_id).chat
    assert chat is not None
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth", ".py"))]
    config = json.loads((tiny_dir / "config.json").read_text())
    assert "auto_map" not in config
    assert config["dtype"] == "float32"
    assert config["model_type"] == _entry(entry_id).model_type
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, **LOAD_KWARGS)
    stop = json.loads((tiny_dir / "generation_config.json").read_text())["eos_token_id"]
    assert set(tokenizer.convert_tokens_to_ids([chat.eos, chat.eot])) <= set(stop)


SEEDS = (0, 0, 1)


@needs_registry
def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    assert REGISTRY is not None
    first_of_type = {e.model_type: e for e in reversed(REGISTRY.by_status(Status.APPROVED))}
    for entry in first_of_type.values():
        template = REGISTRY.chat_template(entry)
        dirs = [materialize_tiny(entry, template, tmp_path / f"{entry.id}-{i}", seed=s) for i, s in enumerate(SEEDS)]
        weights = [(d / "model.safetensors").read_bytes() for d in dirs]
        assert weights[0] == weights[1], entry.id
        assert weights[0] != weights[2], entry.id


# --------------------------------------------------------------------------- scaling rules, on hand-made entries

LLAMA3_CHAT = ChatSpec(
    template="llama3",
    bos="<|begin_of_text|>",
    eos="<|end_of_text|>",
    eot="<|eot_id|>",
    extra_special=("<|start_header_id|>", "<|end_header_id|>"),
)
GEMMA_CHAT = ChatSpec(template="gemma", bos="<bos>", eos="<eos>", eot="<end_of_turn>", pad="<pad>")


def _made(model_type: str, chat: ChatSpec = LLAMA3_CHAT, **arch: Any) -> ModelEntry:
    return ModelEntry(
        id=f"tiny-{model_type}",
        name=model_type,
        status=Status.APPROVED,
        developer={"entity": "Test", "country": "US"},
        source={"repo": "test/model"},
        architecture={"model_type": model_type, **arch},
        chat=chat,
    )


@pytest.mark.parametrize(("heads", "kv", "tiny_kv"), [(32, 32, TINY_HEADS), (32, 8, 2), (24, 8, 2), (4, 1, 1)])
def test_attention_grouping_kind_is_kept(heads: int, kv: int, tiny_kv: int) -> None:
    config = tiny_config(_made("llama", hidden_size=heads * 128, num_attention_heads=heads, num_key_value_heads=kv))
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (TINY_HEADS, tiny_kv, 16)
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)


def test_llama3_rope_scaling_keeps_its_ratio() -> None:
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    rope["original_max_position_embeddings"] = 8192
    config = tiny_config(_made("llama", max_position_embeddings=131072, rope_scaling=rope, rope_theta=5e5))
    assert config.max_position_embeddings == 4096
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["original_max_position_embeddings"] == 256
    assert rope["original_max_position_embeddings"] == 8192, "the entry's own dict must not be modified"


def test_gemma3_keeps_one_sliding_and_one_full_layer() -> None:
    arch = {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "hidden_size": 1152}
    arch |= {"sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256}
    arch |= {"max_position_embeddings": 32768, "rope_theta": 1e6, "rope_local_base_freq": 1e4}
    config = tiny_config(_made("gemma3_text", GEMMA_CHAT, **arch))
    assert config.layer_types == ["sliding_attention", "full_attention"]
    assert config.sliding_window == 32 and config.query_pre_attn_scalar == 16
    assert config.num_key_value_heads == 1
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 1e4


def test_phi3_longrope_partial_rotary_factors_are_resampled() -> None:
    rope = {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [float(i) for i in range(48)]}
    arch = {"hidden_size": 3072, "num_attention_heads": 24, "num_key_value_heads": 8, "partial_rotary_factor": 0.75}
    arch |= {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_scaling": rope}
    config = tiny_config(_made("phi3", **arch))
    params = config.rope_parameters
    assert params["rope_type"] == "longrope" and params["partial_rotary_factor"] == 0.75
    assert len(params["long_factor"]) == len(params["short_factor"]) == 6  # 16 * 0.75 / 2
    assert params["long_factor"][0] == 0.0 and params["long_factor"][-1] == 47.0
    assert config.original_max_position_embeddings == 128


def test_granite_multipliers_are_kept_and_attention_scale_follows_head_dim() -> None:
    arch = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8, "embedding_multiplier": 12.0}
    arch |= {"residual_multiplier": 0.22, "attention_multiplier": 1 / 64, "logits_scaling": 8.0}
    config = tiny_config(_made("granite", tie_word_embeddings=True, **arch))
    assert (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling) == (12.0, 0.22, 8.0)
    assert config.attention_multiplier == pytest.approx(1 / 16)
    assert config.tie_word_embeddings is True


def test_ids_come_from_the_tokenizer() -> None:
    tokenizer = build_tokenizer(GEMMA_CHAT, "")
    config = tiny_config(_made("gemma2", GEMMA_CHAT), tokenizer)
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == tuple(
        tokenizer.convert_tokens_to_ids(["<bos>", "<eos>", "<pad>"])
    )
    assert config.layer_types == ["sliding_attention", "full_attention"]


def test_tokenizer_is_deterministic_and_adds_bos_once() -> None:
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"
    a, b = build_tokenizer(LLAMA3_CHAT, template), build_tokenizer(LLAMA3_CHAT, template)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    ids = a.encode("hi")
    assert ids[0] == a.bos_token_id and ids.count(a.bos_token_id) == 1
    assert a.encode("hi", add_special_tokens=False) == ids[1:]
    chat_ids = a.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)["input_ids"]
    assert chat_ids[:2] == [a.bos_token_id, ids[1]]
    no_bos = build_tokenizer(ChatSpec(template="t", eos="<|endoftext|>", eot="<|im_end|>"), template)
    assert no_bos.bos_token is None and no_bos.pad_token == "<|endoftext|>"
    assert no_bos.encode("hi") == no_bos.encode("hi", add_special_tokens=False)
    shared = ChatSpec(template="t", bos="<|endoftext|>", eos="<|endoftext|>", eot="<|endoftext|>")
    shared_tok = build_tokenizer(shared, template)  # a "bos" that doubles as eos is not prepended
    assert shared_tok.encode("hi") == shared_tok.encode("hi", add_special_tokens=False)


def test_refuses_entries_without_architecture_or_chat(tmp_path: Path) -> None:
    family = ModelEntry(
        id="denied-family",
        kind="family",
        name="Denied",
        status=Status.DENIED,
        reason="test",
        developer={"entity": "X", "country": "US"},
        repos=("x/*",),
    )
    with pytest.raises(FinetuneError, match="no architecture"):
        materialize_tiny(family, "", tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("arch", "message"),
    [({"hidden_size": 100, "num_attention_heads": 3}, "rejects its architecture"), ({}, "Unrecognized model")],
)
def test_invalid_architectures_are_finetune_errors(arch: dict[str, Any], message: str) -> None:
    entry = _made("llama" if arch else "no_such_model_type", **arch)
    with pytest.raises(FinetuneError, match=message):
        tiny_config(entry)


def test_publishes_atomically_and_refuses_to_overwrite(tmp_path: Path) -> None:
    entry = _made("mistral", sliding_window=4096, max_position_embeddings=32768)
    dest = materialize_tiny(entry, "{{ messages }}", tmp_path / "m")
    with pytest.raises(FinetuneError, match="already exists"):
        materialize_tiny(entry, "", dest)
    materialize_tiny(entry, "", dest, seed=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "no temporary folder may be left behind"
    assert json.loads((dest / "config.json").read_text())["sliding_window"] == 32


def test_no_network_fixture_refuses_connections(no_network: None) -> None:
    with pytest.raises(OSError, match="offline"):
        socket.create_connection(("127.0.0.1", 9))
    with socket.socket() as sock, pytest.raises(OSError, match="offline"):
        sock.connect(("127.0.0.1", 9))
