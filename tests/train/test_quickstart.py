"""`finetune train recipes/quickstart.yaml` on CPU: falling loss, metrics, a final model for plain transformers."""

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from finetune.cli import main
from finetune.train.metrics import read_metrics

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
    records = read_metrics(job / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(steps) == steps[-1]["step"] and steps[-1]["step"] > 10
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert evals and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["trained_tokens"] > 0 for r in steps)
    assert [r["event"] for r in records if r["kind"] == "event"] == ["start", "end"]

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
    # the same command again resumes the finished job: nothing left to do
    assert main(["train", str(ROOT / "recipes" / "quickstart.yaml"), "--output", str(job)]) == 0
