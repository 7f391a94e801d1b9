"""`finetune train recipes/quickstart.yaml` on CPU: falling loss, metrics, a final model for plain transformers."""

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from finetune.cli import main
from finetune.events import read_events
from finetune.storage import Bucket

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_quickstart_trains_and_leaves_a_loadable_final_model(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path / "data"))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["train", str(ROOT / "recipes" / "quickstart.yaml"), "--output", str(tmp_path / "job")])
    assert code == 0, err.getvalue()[-3000:]
    job = tmp_path / "job"
    assert json.loads((job / "recipe.json").read_text())["name"] == "quickstart"
    assert json.loads((job / "data_report.json").read_text())["rows_used"] == 52
    events = read_events(Bucket.folder(job), "")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    steps = [e for e in events if e.kind == "step"]
    evals = [e for e in events if e.kind == "eval"]
    assert len(steps) == steps[-1].step and steps[-1].step > 10
    first, last = sum(e.loss for e in steps[:3]) / 3, sum(e.loss for e in steps[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert evals and evals[-1].eval_loss < evals[0].eval_loss
    assert all(e.grad_norm > 0 and e.tokens_per_s > 0 and e.trained_tokens > 0 for e in steps)
    assert [e.kind for e in events if e.kind not in ("step", "eval", "checkpoint")] == ["start", "end"]
    assert events[-1].kind == "end" and events[-1].summary.final == "final"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = job / "final"
    assert not list(final.glob("*.bin")) and list(final.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(final, local_files_only=True)
    generation = json.loads((final / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    chat = [{"role": "user", "content": "臺灣的首都是哪裡？"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    assert torch.isfinite(model(ids).logits).all()
    # the same command again resumes the finished job: nothing left to do, the numbering goes on
    assert main(["train", str(ROOT / "recipes" / "quickstart.yaml"), "--output", str(job)]) == 0
    again = read_events(Bucket.folder(job), "", after=len(events))
    assert [e.kind for e in again] == ["resume", "end"] and again[0].seq == len(events) + 1
