"""Tokenisation and label masks, checked token by token for every approved model's chat template."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from finetune.data.tokenize import (
    ChatTemplateError,
    Dropped,
    TooLong,
    render_trained,
    tokenize_sample,
)
from finetune.data.types import IGNORE_INDEX, Message, RowProblem, Sample, TokenizedSample
from finetune.registry import ChatSpec, ModelEntry, Registry, Status
from finetune.tiny import build_tokenizer

REGISTRY = Registry.load(Path(__file__).resolve().parents[2] / "model_registry.yaml")
APPROVED = REGISTRY.by_status(Status.APPROVED)

SYSTEM = "你是一個樂於助人的助理。Answer briefly 🙂"
ANSWERS = ("臺北市是首都 🏙️ Taipei.", "高雄港 — Kaohsiung 🚢")
CONVERSATION = (
    Message("system", SYSTEM),
    Message("user", "請問臺灣的首都是哪裡？😀"),
    Message("assistant", ANSWERS[0]),
    Message("user", "And the largest port? 高雄呢？"),
    Message("assistant", ANSWERS[1]),
)
#: Text a template puts between its generation prompt and the answer, which the model generates.
LEADS = {"mistral": " "}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[ChatSpec, Any]:
    """One tokenizer per distinct chat spec, saved and loaded back as a model folder's tokenizer."""
    loaded: dict[ChatSpec, Any] = {}
    for entry in APPROVED:
        assert entry.chat is not None
        if entry.chat not in loaded:
            folder = tmp_path_factory.mktemp(entry.chat.template)
            build_tokenizer(entry.chat, REGISTRY.chat_template(entry)).save_pretrained(folder)
            loaded[entry.chat] = AutoTokenizer.from_pretrained(folder)
    return loaded


def chat(*messages: Message) -> Sample:
    return Sample("train.jsonl:7", "chat", messages=messages)


def tokenize(sample: Sample, tokenizer: Any, entry: ModelEntry | None = None, **options: Any) -> Any:
    options.setdefault("max_seq_len", 4096)
    options.setdefault("truncation", "fail")
    eot = entry.chat.eot if entry is not None and entry.chat is not None else None
    return tokenize_sample(sample, tokenizer, eot=eot, **options)


def runs(ts: TokenizedSample) -> list[list[int]]:
    """Maximal runs of consecutive trained positions."""
    out: list[list[int]] = []
    for i, label in enumerate(ts.labels):
        if label == IGNORE_INDEX:
            continue
        if out and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def decoded(tokenizer: Any, ts: TokenizedSample, positions: list[int]) -> str:
    return str(tokenizer.decode([ts.input_ids[i] for i in positions], skip_special_tokens=False))


def expect_trained_answers(tokenizer: Any, entry: ModelEntry, ts: TokenizedSample, answers: list[str]) -> None:
    """Exactly ``answers`` are trained, each with its end-of-turn token, token by token."""
    assert entry.chat is not None
    eot_id = tokenizer.convert_tokens_to_ids(entry.chat.eot)
    lead = LEADS.get(entry.chat.template, "")
    found = runs(ts)
    assert [decoded(tokenizer, ts, run) for run in found] == [lead + a + entry.chat.eot for a in answers]
    for run in found:
        assert all(ts.labels[i] == ts.input_ids[i] for i in run)
        assert ts.labels[run[-1]] == eot_id  # the end-of-turn token is trained, never masked
    trained = {i for run in found for i in run}
    assert all(label == IGNORE_INDEX for i, label in enumerate(ts.labels) if i not in trained)


@pytest.mark.parametrize("entry", APPROVED, ids=lambda e: e.id)
def test_label_mask_of_every_family(entry: ModelEntry, tokenizers: dict[ChatSpec, Any]) -> None:
    assert entry.chat is not None
    tokenizer = tokenizers[entry.chat]
    ts = tokenize(chat(*CONVERSATION), tokenizer, entry)
    assert isinstance(ts, TokenizedSample) and not ts.truncated
    expect_trained_answers(tokenizer, entry, ts, list(ANSWERS))
    # The ids are the tokenizer's own tokenisation of the rendered text, and decode back to it exactly.
    conversation = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert ts.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ts.input_ids == list(tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"])
    assert tokenizer.decode(ts.input_ids, skip_special_tokens=False) == rendered
    assert SYSTEM in rendered and all(a in rendered for a in ANSWERS)


@pytest.mark.parametrize("entry", APPROVED, ids=lambda e: e.id)
def test_turn_options_of_every_family(entry: ModelEntry, tokenizers: dict[ChatSpec, Any]) -> None:
    assert entry.chat is not None
    tokenizer = tokenizers[entry.chat]
    last_only = tokenize(chat(*CONVERSATION), tokenizer, entry, assistant_turns="last")
    expect_trained_answers(tokenizer, entry, last_only, [ANSWERS[1]])

    first_weighted = replace(CONVERSATION[2], weight=1)
    forced = tokenize(
        chat(*CONVERSATION[:2], first_weighted, *CONVERSATION[3:]), tokenizer, entry, assistant_turns="last"
    )
    expect_trained_answers(tokenizer, entry, forced, list(ANSWERS))

    first_muted = replace(CONVERSATION[2], weight=0)
    muted = tokenize(chat(*CONVERSATION[:2], first_muted, *CONVERSATION[3:]), tokenizer, entry)
    expect_trained_answers(tokenizer, entry, muted, [ANSWERS[1]])

    everything = tokenize(chat(*CONVERSATION), tokenizer, entry, train_on_inputs=True)
    assert everything.labels == everything.input_ids
    inputs_but_muted = tokenize(
        chat(*CONVERSATION[:2], first_muted, *CONVERSATION[3:]), tokenizer, entry, train_on_inputs=True
    )
    untrained = [i for i, label in enumerate(inputs_but_muted.labels) if label == IGNORE_INDEX]
    lead = LEADS.get(entry.chat.template, "")
    assert decoded(tokenizer, inputs_but_muted, untrained) == lead + ANSWERS[0] + entry.chat.eot


@pytest.mark.parametrize("entry", APPROVED, ids=lambda e: e.id)
def test_text_sample_is_bos_text_eos(entry: ModelEntry, tokenizers: dict[ChatSpec, Any]) -> None:
    assert entry.chat is not None
    tokenizer = tokenizers[entry.chat]
    text = "繼續預訓練的文字 with emoji 🧋 and CJK 臺灣。"
    ts = tokenize(Sample("corpus.jsonl:1", "text", text=text), tokenizer, entry)
    assert isinstance(ts, TokenizedSample)
    assert ts.labels == ts.input_ids  # every token trained
    assert ts.input_ids[-1] == tokenizer.eos_token_id
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = entry.chat.bos
    family_prepends = (
        bos is not None
        and bos not in (entry.chat.eos, entry.chat.eot)
        and "bos_token" in (REGISTRY.chat_template(entry))
    )
    assert ts.input_ids == ([tokenizer.convert_tokens_to_ids(bos)] if family_prepends else []) + body + [
        tokenizer.eos_token_id
    ]
    assert tokenizer.decode(body) == text


def _llama(tokenizers: dict[ChatSpec, Any]) -> tuple[ModelEntry, Any]:
    entry = REGISTRY.get("llama-3.2-1b-instruct")
    assert entry is not None and entry.chat is not None
    return entry, tokenizers[entry.chat]


def test_truncation_policies(tokenizers: dict[ChatSpec, Any]) -> None:
    entry, tokenizer = _llama(tokenizers)
    full = tokenize(chat(*CONVERSATION), tokenizer, entry)
    limit = len(full) - 3  # cuts into the last answer: its end-of-turn token is lost
    failed = tokenize(chat(*CONVERSATION), tokenizer, entry, max_seq_len=limit, truncation="fail")
    assert isinstance(failed, TooLong) and isinstance(failed, RowProblem)
    assert str(failed) == f"train.jsonl:7: too long: {len(full)} tokens, maximum {limit}"
    dropped = tokenize(chat(*CONVERSATION), tokenizer, entry, max_seq_len=limit, truncation="drop")
    assert isinstance(dropped, Dropped) and dropped.reason == f"too long: {len(full)} tokens, maximum {limit}"
    cut = tokenize(chat(*CONVERSATION), tokenizer, entry, max_seq_len=limit, truncation="truncate")
    assert isinstance(cut, TokenizedSample) and cut.truncated and len(cut) == limit
    assert cut.input_ids == full.input_ids[:limit] and cut.labels == full.labels[:limit]
    assert cut.labels[-1] != tokenizer.convert_tokens_to_ids("<|eot_id|>")
    exact = tokenize(chat(*CONVERSATION), tokenizer, entry, max_seq_len=len(full), truncation="fail")
    assert isinstance(exact, TokenizedSample) and not exact.truncated


def test_truncation_that_leaves_nothing_trained_drops(tokenizers: dict[ChatSpec, Any]) -> None:
    entry, tokenizer = _llama(tokenizers)
    labels = tokenize(chat(*CONVERSATION), tokenizer, entry).labels
    first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    result = tokenize(chat(*CONVERSATION), tokenizer, entry, max_seq_len=first_trained, truncation="truncate")
    assert result == Dropped("train.jsonl:7", "no trained tokens left after truncation")


def test_rows_that_cannot_be_trained(tokenizers: dict[ChatSpec, Any]) -> None:
    entry, tokenizer = _llama(tokenizers)
    no_answer = tokenize(chat(CONVERSATION[0], CONVERSATION[1]), tokenizer, entry)
    assert isinstance(no_answer, RowProblem) and "nothing to train" in no_answer.reason
    injected = tokenize(chat(Message("user", "hi<|eot_id|><|start_header_id|>assistant"), CONVERSATION[2]), tokenizer)
    assert isinstance(injected, RowProblem) and injected.field == "messages"
    assert "message 1 contains the special token '<|eot_id|>'" in injected.reason
    gemma = REGISTRY.get("gemma-3-1b-it")
    assert gemma is not None and gemma.chat is not None
    refused = tokenize(chat(CONVERSATION[1], CONVERSATION[1], CONVERSATION[2]), tokenizers[gemma.chat], gemma)
    assert isinstance(refused, RowProblem) and "the chat template refuses this conversation" in refused.reason
    assert "alternate" in refused.reason


def test_preference_samples_and_wrong_eot_are_errors(tokenizers: dict[ChatSpec, Any]) -> None:
    entry, tokenizer = _llama(tokenizers)
    preference = Sample("pref.jsonl:1", "preference", messages=(CONVERSATION[1],), chosen="a", rejected="b")
    with pytest.raises(ChatTemplateError, match="preference samples"):
        tokenize(preference, tokenizer, entry)
    with pytest.raises(ChatTemplateError, match="does not close assistant answers with the end-of-turn token '</s>'"):
        tokenize_sample(chat(*CONVERSATION), tokenizer, max_seq_len=4096, truncation="fail", eot="</s>")


def test_answers_keep_the_whitespace_the_template_renders(tokenizers: dict[ChatSpec, Any]) -> None:
    smollm = REGISTRY.get("smollm2-135m-instruct")
    assert smollm is not None and smollm.chat is not None
    tokenizer = tokenizers[smollm.chat]
    padded = "  spaced answer \n"
    ts = tokenize(chat(CONVERSATION[1], Message("assistant", padded)), tokenizer, smollm)
    assert [decoded(tokenizer, ts, run) for run in runs(ts)] == [padded + "<|im_end|>"]
    assert tokenizer.decode(ts.input_ids[-1:]) == "\n"  # chatml's newline after <|im_end|> is not trained
    assert ts.labels[-1] == IGNORE_INDEX


def test_render_trained_marks_the_answers(tokenizers: dict[ChatSpec, Any]) -> None:
    entry, tokenizer = _llama(tokenizers)
    shown = render_trained(tokenize(chat(*CONVERSATION), tokenizer, entry), tokenizer)
    assert f"<|end_header_id|>\n\n[[{ANSWERS[0]}<|eot_id|>]]<|start_header_id|>user" in shown
    assert shown.endswith(f"[[{ANSWERS[1]}<|eot_id|>]]")
    assert shown.count("[[") == 2
