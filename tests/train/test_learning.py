"""A tiny model learns a synthetic question/answer set and stops at its end-of-turn token.

Acceptance: after ``finetune train`` (full fine-tuning of a tiny random-weight model on CPU) the
``final/`` folder, loaded with plain ``transformers``, answers at least 95% of 60 questions
exactly by greedy generation, and every generation ends with the family's end-of-turn token
before ``max_new_tokens``.

The set mixes a rule to learn (spell a number in English words or in Chinese digits: 48 pairs)
with facts to memorise (12 pairs), in English and Traditional Chinese; every answer is unique.
Two families run: SmolLM2 (chatml, whose end-of-turn token is also its EOS) and Phi-3.5, whose
end-of-turn token ``<|end|>`` is not its EOS, so stopping there proves that the training data
closes answers with it and that ``final/generation_config.json`` stops on it.

Settings found by trial on 2 CPU cores (the tiny model is 2 layers of width 64, ~140k
parameters): learning rate 0.01 (the recipe's maximum), 60 epochs of 5 steps, cosine decay. The
loss settles below 0.02 by about epoch 35; with 40 epochs SmolLM2 did not get there.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from finetune.cli import main
from finetune.events import latest_by_step, read_events
from finetune.registry import Registry
from finetune.settings import Settings
from finetune.storage import Bucket

SYSTEM = "Answer briefly."
MAX_NEW_TOKENS = 32
EN_DIGITS = "zero one two three four five six seven eight nine".split()
ZH_DIGITS = "〇一二三四五六七八九"
FACTS = [
    ("What is the capital of Taiwan?", "Taipei"),
    ("Which planet is called the red planet?", "Mars"),
    ("What colour is a clear sky?", "blue"),
    ("How many legs does a spider have?", "eight"),
    ("What is the opposite of hot?", "cold"),
    ("Which animal says moo?", "a cow"),
    ("臺灣的首都是哪裡？", "臺北市"),
    ("一年有幾個月？", "十二個月"),
    ("太陽從哪個方向升起？", "東方"),
    ("水的化學式是什麼？", "H2O"),
    ("珍珠奶茶源自哪裡？", "臺灣"),
    ("一週有幾天？", "七天"),
]


def qa_pairs() -> list[tuple[str, str]]:
    """60 deterministic pairs: 32 numbers spelled in English, 16 in Chinese digits, 12 facts."""
    pairs = []
    for j, n in enumerate(random.Random(3).sample(range(10, 100), 48)):
        if j % 3 == 2:
            pairs.append((f"請用中文寫出數字{n}。", "".join(ZH_DIGITS[int(d)] for d in str(n))))
        else:
            pairs.append((f"Spell the number {n}.", " ".join(EN_DIGITS[int(d)] for d in str(n))))
    return pairs + FACTS


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for question, answer in pairs:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


@pytest.fixture
def one_thread():
    """Train on one thread: the arithmetic the settings were tuned with, and no contention on a busy runner."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.mark.integration
@pytest.mark.parametrize("model_id", ["smollm2-135m-instruct", "phi-3.5-mini-instruct"])
def test_tiny_model_learns_the_set_and_stops_at_its_end_of_turn_token(tmp_path, monkeypatch, one_thread, model_id):
    """>= 95% exact-match greedy answers from ``final/`` with plain transformers; each ends with the eot token."""
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path / "data"))
    pairs = qa_pairs()
    assert len(pairs) >= 50 and len({q for q, _ in pairs}) == len({a for _, a in pairs}) == len(pairs)
    bucket, job = tmp_path / "bucket", tmp_path / "job"
    write_jsonl(bucket / "data" / "qa.jsonl", pairs)
    # An eval file (a few training pairs again) rather than no eval data: with eval fraction 0 the
    # empty eval split does not load back from the data cache (datasets cannot read an empty
    # dataset saved to disk), and the worker fails.
    write_jsonl(bucket / "data" / "seen.jsonl", pairs[::10])
    recipe = {
        "name": "learning",
        "model": {"id": model_id, "tiny": True},
        "data": {
            "path": "data/qa.jsonl",
            "format": "messages",
            "system_prompt": SYSTEM,
            "max_seq_len": 128,
            "packing": True,
            "eval": {"path": "data/seen.jsonl"},
        },
        "method": {"type": "full"},
        "training": {
            "epochs": 60,
            "learning_rate": 0.01,
            "warmup_ratio": 0.05,
            "micro_batch_size": 4,
            "gradient_checkpointing": False,
            "seed": 0,
            "eval_every_steps": 100,
        },
        "output": {"archive": "merged"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")

    code = main(["train", str(tmp_path / "recipe.yaml"), "--output", str(job), "--bucket", str(bucket)])

    assert code == 0
    assert json.loads((job / "data_report.json").read_text())["train_samples"] == len(pairs)
    events = read_events(Bucket.folder(job), "")
    losses = [e.loss for e in latest_by_step(events, "step")]
    assert len(losses) == 300 and sum(losses[-10:]) / 10 < 0.05, losses[-10:]
    assert latest_by_step(events, "eval")[-1].eval_loss < 0.05

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = job / "final"
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(final, local_files_only=True)
    settings = Settings()
    chat = Registry.load(settings.registry, settings.lock_path).get(model_id).chat
    eot = tokenizer.convert_tokens_to_ids(chat.eot)
    assert isinstance(eot, int) and eot != tokenizer.unk_token_id
    stop_ids = model.generation_config.eos_token_id  # as saved in final/generation_config.json
    assert eot in ([stop_ids] if isinstance(stop_ids, int) else stop_ids)
    assert (eot == tokenizer.eos_token_id) == (chat.eot == chat.eos)

    exact, not_stopped, wrong = 0, [], []
    for question, answer in pairs:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        if text == answer:
            exact += 1
        else:
            wrong.append((question, answer, text))
        if not (len(new) < MAX_NEW_TOKENS and new[-1] == eot and new.index(eot) == len(new) - 1):
            not_stopped.append((question, tokenizer.decode(new)))
    print(f"{model_id}: {exact}/{len(pairs)} exact, {len(pairs) - len(not_stopped)} ended with {chat.eot}")
    assert exact / len(pairs) >= 0.95, f"{exact}/{len(pairs)} exact; wrong: {wrong}"
    assert not not_stopped, f"generations that did not end with {chat.eot}: {not_stopped}"
