"""Tokenisation of samples with the model's own tokenizer and chat template, and the label mask.

Chat samples are rendered once with the tokenizer's chat template and the text is tokenised once
(``add_special_tokens=False``: templates emit ``bos`` themselves), so the ids are exactly the
tokenizer's own tokenisation of the rendered conversation. Labels are found on the text, then
mapped to tokens through the offsets:

* Where each assistant answer is: the conversation is rendered again with that answer replaced by
  a sentinel character; the text before and after the sentinel must equal the full render, so the
  answer's place is exact whatever the template does around it (trim, system prompt moved into a
  later turn as Mistral does).
* Where the trained part of a turn starts: after the generation prompt, i.e. the render of the
  messages before the answer with ``add_generation_prompt=True`` when that render is a prefix of
  the full render (true of every registry template except Mistral's with a system prompt, whose
  earlier turns move). Otherwise it starts at the answer, and whitespace the template puts between
  its generation prompt and the answer (Mistral's ``" "`` after ``[/INST]``) is trained with it.
* Where it ends: the special token the template emits right after the answer is the end-of-turn
  token (``<|eot_id|>``, ``<end_of_turn>``, ``</s>``, ``<|end|>``, ``<|im_end|>``...). It is
  trained, so the model learns to stop; whatever follows it (chatml's ``"\\n"``) is not.

A token is trained when its characters overlap a trained span. The label of a sample's first token
is kept as is, but it is never a prediction target (nothing precedes it); packing masks it.

Results for the caller to count (see :func:`tokenize_sample`): a :class:`TokenizedSample`
(``truncated`` says it was cut), a :class:`Dropped` sample (left out on purpose, counted), or a
:class:`~finetune.data.types.RowProblem` (a bad row; a :class:`TooLong` one when the recipe says
``truncation: fail``, which the caller turns into a job failure).
"""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from typing import Any, Literal

from jinja2 import TemplateError

from finetune.data.limits import surrogate_reason, unpaired_surrogate
from finetune.data.types import IGNORE_INDEX, Message, RowProblem, Sample, TokenizedSample
from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)

Truncation = Literal["drop", "truncate", "fail"]
AssistantTurns = Literal["all", "last"]

#: Characters from Unicode's private use area that stand in for an answer while locating it.
_SENTINELS = "".join(chr(c) for c in range(0xE000, 0xE020))


class ChatTemplateError(FinetuneError):
    """The tokenizer or its chat template cannot show which tokens are trained (not a row problem)."""


@dataclass(frozen=True, slots=True)
class Dropped:
    """A sample left out on purpose (``truncation: drop``, or nothing trained left after truncation).

    Not a bad row: the caller counts dropped samples and reports the count.
    """

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True, slots=True)
class TooLong(RowProblem):
    """A sample longer than ``max_seq_len`` under ``truncation: fail``: the caller fails the job."""

    tokens: int = 0
    max_seq_len: int = 0


TokenizeResult = TokenizedSample | Dropped | RowProblem


def tokenize_sample(
    sample: Sample,
    tokenizer: Any,
    *,
    max_seq_len: int,
    truncation: Truncation,
    train_on_inputs: bool = False,
    assistant_turns: AssistantTurns = "all",
    eot: str | None = None,
) -> TokenizeResult:
    """Token ids and labels of one sample, or why it is left out.

    Chat samples train the answers of assistant turns and the end-of-turn token that closes each
    (never the assistant header). A message's ``weight`` (0 or 1) overrides whether that assistant
    message is trained. Text samples are ``bos + text + eos`` as the tokenizer does for plain text
    (``bos`` only where the family prepends it), every token trained.

    Args:
        sample: A normalised chat or text sample.
        tokenizer: The model's fast tokenizer, with its chat template.
        max_seq_len: The longest sample, in tokens.
        truncation: ``"truncate"`` cuts longer samples (``TokenizedSample.truncated``; a cut chat
            sample may lose its last end-of-turn token), ``"drop"`` returns :class:`Dropped`,
            ``"fail"`` returns :class:`TooLong`.
        train_on_inputs: Also train every token outside the assistant turns (system, user,
            headers); assistant turns that are not trained stay masked.
        assistant_turns: ``"all"`` trains every assistant turn, ``"last"`` only the last one.
        eot: The family's end-of-turn token (registry ``chat.eot``), when known: the template must
            close every answer with it. When None, any special token closing the answer is accepted.

    Returns:
        A :class:`TokenizedSample`; :class:`Dropped` (too long with ``"drop"``, or no trained token
        left after truncation); :class:`TooLong` (too long with ``"fail"``); or a
        :class:`RowProblem` (the template refuses the conversation, a message holds a special
        token's text, or nothing in the sample is trained).

    Raises:
        ChatTemplateError: Preference samples (not trainable by supervised fine-tuning; refuse
            the recipe before tokenising), a slow tokenizer, a missing chat template, or a
            template that does not render answers verbatim or close them with a special token.
    """
    if sample.kind == "preference":
        raise ChatTemplateError(
            f"{sample.where}: preference samples cannot be tokenised for supervised fine-tuning; "
            "preference training is not offered yet"
        )
    special = _specials(tokenizer)
    problem = _surrogate_problem(sample) or _special_token_problem(sample, special)
    if problem is not None:
        return problem
    if sample.kind == "text":
        ids = _text_ids(sample.text or "", tokenizer)
        labels = list(ids)
    else:
        try:
            ids, labels = _chat_ids_labels(sample.messages, tokenizer, special, train_on_inputs, assistant_turns, eot)
        except TemplateError as exc:
            return RowProblem(sample.where, f"the chat template refuses this conversation: {exc}", field="messages")
    if not _has_target(labels):
        return RowProblem(sample.where, "nothing to train: no assistant answer is trained in this sample")
    return _fit(sample.where, ids, labels, max_seq_len, truncation)


def _surrogate_problem(sample: Sample) -> RowProblem | None:
    """A lone surrogate, which no tokenizer can encode (readers refuse such rows; samples may come from elsewhere)."""
    chat = sample.kind == "chat"
    for i, text in enumerate([m.content for m in sample.messages] if chat else [sample.text or ""]):
        char = unpaired_surrogate(text)
        if char:
            what = f"message {i + 1}" if chat else "the text"
            return RowProblem(sample.where, f"{what} {surrogate_reason(char)}", field="messages" if chat else "text")
    return None


def _special_token_problem(sample: Sample, special: _Specials) -> RowProblem | None:
    """A message (or text) holding a special token's text, which would become a control token."""
    texts = [m.content for m in sample.messages] if sample.kind == "chat" else [sample.text or ""]
    for i, text in enumerate(texts):
        found = special.pattern.search(text)
        if found:
            what = f"message {i + 1}" if sample.kind == "chat" else "the text"
            return RowProblem(
                sample.where,
                f"{what} contains the special token {found.group(0)!r}, which the tokenizer would read "
                "as a control token",
                field="messages" if sample.kind == "chat" else "text",
            )
    return None


def special_token_in(text: str, tokenizer: Any) -> str | None:
    """The first special token whose text appears in ``text`` (it would become a control token), or None."""
    found = _specials(tokenizer).pattern.search(text)
    return found.group(0) if found else None


def _has_target(labels: list[int]) -> bool:
    """Whether any label is a prediction target (the first token never is: nothing precedes it)."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def _fit(where: str, ids: list[int], labels: list[int], max_seq_len: int, truncation: Truncation) -> TokenizeResult:
    """Apply the recipe's policy for samples longer than ``max_seq_len``."""
    if len(ids) <= max_seq_len:
        return TokenizedSample(where, ids, labels)
    reason = f"too long: {len(ids)} tokens, maximum {max_seq_len}"
    if truncation == "fail":
        return TooLong(where, reason, tokens=len(ids), max_seq_len=max_seq_len)
    if truncation == "drop":
        return Dropped(where, reason)
    if truncation != "truncate":
        raise ValueError(f"unknown truncation policy {truncation!r}")
    labels = labels[:max_seq_len]
    if not _has_target(labels):
        return Dropped(where, "no trained tokens left after truncation")
    return TokenizedSample(where, ids[:max_seq_len], labels, truncated=True)


# ------------------------------------------------------------------------------ tokenizer facts


@dataclass(frozen=True, slots=True)
class _Specials:
    tokens: tuple[str, ...]  # longest first, so the longest match wins
    pattern: re.Pattern[str]


_SPECIALS: weakref.WeakKeyDictionary[Any, _Specials] = weakref.WeakKeyDictionary()


def _specials(tokenizer: Any) -> _Specials:
    """The tokenizer's special tokens (cached per tokenizer); checks it is fast and has a template."""
    cached = _SPECIALS.get(tokenizer)
    if cached is not None:
        return cached
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError("tokenisation needs a fast tokenizer (tokenizer.json): offsets map text to tokens")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = {t.content for t in added.values() if getattr(t, "special", False)}
    names.update(t for t in getattr(tokenizer, "all_special_tokens", []) if t)
    tokens = tuple(sorted(names, key=lambda t: (-len(t), t)))
    pattern = re.compile("|".join(re.escape(t) for t in tokens) if tokens else r"(?!)")
    result = _Specials(tokens, pattern)
    _SPECIALS[tokenizer] = result
    return result


# ------------------------------------------------------------------------------ text samples


def _text_ids(text: str, tokenizer: Any) -> list[int]:
    """``bos + text + eos`` as the family encodes plain text."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


# ------------------------------------------------------------------------------ chat samples


def _render(tokenizer: Any, conversation: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
    return str(text)


def _trained_turns(messages: tuple[Message, ...], assistant_turns: AssistantTurns) -> dict[int, bool]:
    """Index of every assistant message -> whether it is trained."""
    answers = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if assistant_turns not in ("all", "last"):
        raise ValueError(f"unknown assistant_turns {assistant_turns!r}")
    default = {i: assistant_turns == "all" or i == answers[-1] for i in answers}
    return {i: bool(messages[i].weight) if messages[i].weight is not None else default[i] for i in answers}


def _chat_ids_labels(
    messages: tuple[Message, ...],
    tokenizer: Any,
    special: _Specials,
    train_on_inputs: bool,
    assistant_turns: AssistantTurns,
    eot: str | None,
) -> tuple[list[int], list[int]]:
    """Render, tokenise once, and label the trained turns."""
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    full = _render(tokenizer, conversation)
    turns = _trained_turns(messages, assistant_turns)
    marks = bytearray(b"\x01" * len(full) if train_on_inputs else len(full))
    for index, trained in turns.items():
        if trained or train_on_inputs:
            start, end = _turn_span(tokenizer, conversation, index, full, special, eot)
            marks[start:end] = (b"\x01" if trained else b"\x00") * (end - start)
    try:
        encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:  # slow tokenizers have no offsets
        raise ChatTemplateError(f"tokenisation needs offsets from a fast tokenizer: {exc}") from exc
    ids = list(encoding["input_ids"])
    labels = [
        tid if (marks.find(1, s, e) >= 0 if e > s else s < len(marks) and marks[s]) else IGNORE_INDEX
        for tid, (s, e) in zip(ids, encoding["offset_mapping"], strict=True)
    ]
    return ids, labels


def _turn_span(
    tokenizer: Any, conversation: list[dict[str, str]], index: int, full: str, special: _Specials, eot: str | None
) -> tuple[int, int]:
    """Character span of assistant message ``index`` in ``full``: trained answer start to end of its eot."""
    answer_start, answer_end = _answer_span(tokenizer, conversation, index, full)
    start = _trained_start(tokenizer, conversation, index, full, answer_start)
    closing = answer_end
    while closing < len(full) and full[closing].isspace():
        closing += 1
    token = next((t for t in special.tokens if full.startswith(t, closing)), None)
    if token is None or (eot is not None and token != eot):
        expected = f"the end-of-turn token {eot!r}" if eot else "a special end-of-turn token"
        raise ChatTemplateError(
            f"the chat template does not close assistant answers with {expected} "
            f"(after message {index + 1} it renders {full[closing : closing + 20]!r})"
        )
    return start, closing + len(token)


def _answer_span(tokenizer: Any, conversation: list[dict[str, str]], index: int, full: str) -> tuple[int, int]:
    """Where the template put assistant message ``index``'s content: render it as a sentinel."""
    used = full + "".join(m["content"] for m in conversation)
    sentinel = next((c for c in _SENTINELS if c not in used), None)
    if sentinel is None:
        raise ChatTemplateError("cannot locate the answer: the conversation uses every sentinel character")
    probe = [dict(m) for m in conversation]
    probe[index]["content"] = sentinel
    rendered = _render(tokenizer, probe)
    at = rendered.find(sentinel)
    before, after = rendered[:at], rendered[at + 1 :]
    if (
        at < 0
        or sentinel in after
        or len(before) + len(after) > len(full)
        or not full.startswith(before)
        or not full.endswith(after)
    ):
        raise ChatTemplateError(
            f"the chat template does not render assistant message {index + 1} verbatim; "
            "its trained tokens cannot be located"
        )
    return len(before), len(full) - len(after)


def _trained_start(tokenizer: Any, conversation: list[dict[str, str]], index: int, full: str, answer_start: int) -> int:
    """Where training starts: after the generation prompt that leads into assistant message ``index``."""
    try:
        prompt: str | None = _render(tokenizer, conversation[:index], generation_prompt=True)
    except TemplateError:
        prompt = None
    if prompt is not None and len(prompt) <= answer_start and full.startswith(prompt):
        if full[len(prompt) : answer_start].strip():
            raise ChatTemplateError(
                f"the chat template puts {full[len(prompt) : answer_start]!r} between the generation prompt and "
                f"assistant message {index + 1}; it would be trained as part of the answer"
            )
        return len(prompt)
    # The earlier turns render differently on their own (Mistral moves the system prompt into the
    # last user turn): the prompt's own trailing whitespace belongs to the header, any further
    # whitespace before the answer is generated by the model and trained.
    logger.debug("generation prompt of message %d is not a prefix of the conversation", index + 1)
    gap_start = answer_start
    while gap_start > 0 and full[gap_start - 1].isspace():
        gap_start -= 1
    header_ws = len(prompt) - len(prompt.rstrip()) if prompt else 0
    return gap_start + min(header_ws, answer_start - gap_start)


# ------------------------------------------------------------------------------ display


def render_trained(tokenized: TokenizedSample, tokenizer: Any, *, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The sample's text with every run of trained tokens between ``[[`` and ``]]``.

    Each run is decoded on its own, so a character split between a trained and an untrained
    token shows as a replacement character at the run's edge.

    Args:
        tokenized: A tokenised sample.
        tokenizer: The tokenizer that made it.
        open_mark: Text put before each trained run.
        close_mark: Text put after each trained run.

    Returns:
        The decoded text with the trained runs marked (special tokens shown).
    """
    pieces: list[str] = []
    run: list[int] = []
    run_trained = False
    for tid, label in zip(tokenized.input_ids, tokenized.labels, strict=True):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            pieces.append(_decoded_run(tokenizer, run, run_trained, open_mark, close_mark))
            run = []
        run.append(tid)
        run_trained = trained
    if run:
        pieces.append(_decoded_run(tokenizer, run, run_trained, open_mark, close_mark))
    return "".join(pieces)


def _decoded_run(tokenizer: Any, ids: list[int], trained: bool, open_mark: str, close_mark: str) -> str:
    text = str(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return f"{open_mark}{text}{close_mark}" if trained else text
