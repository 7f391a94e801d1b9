"""Archives built from tiny LoRA and full jobs: contents, loading, logits, the card, errors, the CLI."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from finetune.archive import ArchiveError, verify_archive
from finetune.archive.card import usage
from finetune.archive.weights import logits_of, prompt_ids
from finetune.cli import main
from finetune.events import EndEvent, JobSummary, ResumeEvent, StartEvent, StepEvent
from finetune.signing import SigningKey, signature_problem

ROOT = Path(__file__).resolve().parents[2]


def _extract(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    [top] = list(dest.iterdir())
    return top


def test_lora_archive_holds_merged_model_and_adapter_that_verify(jobs, data_dir, tmp_path):
    out = tmp_path / "lora.tar"
    result = jobs.build(jobs.lora, out)
    report = verify_archive(out, key=jobs.key.public)
    assert report.ok, report.problems
    assert any(c.startswith("model/: logits equal") for c in report.checks)
    assert any(c.startswith("adapter/: logits equal") for c in report.checks)

    top = _extract(out, tmp_path / "x")
    manifest = json.loads((top / "manifest.json").read_text())
    assert manifest["format"] == "finetune-model-archive" and manifest["format_version"] == 1
    assert signature_problem(manifest, jobs.key.public) is None and manifest == result.manifest
    assert manifest["contents"] == {"merged": "model", "adapter": "adapter"} == result.manifest["contents"]
    base = manifest["base_model"]
    assert base["id"] == "smollm2-135m-instruct" and base["revision"] == "tiny-random"
    assert base["origin"]["decision"] == "allow" and base["developer"] == "Hugging Face" and base["country"] == "US"
    assert "model.safetensors" in base["files"] and len(base["files"]["model.safetensors"]["sha256"]) == 64
    assert manifest["engine"]["version"] and manifest["job"]["step"] == 4 and manifest["job"]["source"] == "final model"
    on_disk = {p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name in ("README.md", "recipe.json", "metrics.jsonl", "loss_curve.png", "data_stats.json"):
        assert name in on_disk
    assert (top / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the merged model in plain transformers, the adapter with peft: both give the engine's logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(top / "model", local_files_only=True)
    merged = AutoModelForCausalLM.from_pretrained(top / "model", local_files_only=True, use_safetensors=True)
    generation = json.loads((top / "model" / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    assert json.loads((top / "model" / "config.json").read_text())["use_cache"] is True
    adapter_config = json.loads((top / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "smollm2-135m-instruct"  # a tiny base has no hub repo
    base_model = AutoModelForCausalLM.from_pretrained(jobs.store / "smollm2-135m-instruct" / "tiny-random")
    with_adapter = PeftModel.from_pretrained(base_model, top / "adapter").eval()
    ids = prompt_ids(tokenizer)
    assert torch.allclose(logits_of(merged.eval(), ids), logits_of(with_adapter, ids), atol=1e-5)


def test_adapter_changes_the_base_model(jobs, data_dir, tmp_path):
    """The merged weights are not the base's: the logits check could fail."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora.tar"
    jobs.build(jobs.lora, out, contents="merged")
    top = _extract(out, tmp_path / "x")
    assert not (top / "adapter").exists()
    merged = AutoModelForCausalLM.from_pretrained(top / "model", local_files_only=True).eval()
    base = AutoModelForCausalLM.from_pretrained(jobs.store / "smollm2-135m-instruct" / "tiny-random").eval()
    ids = [1, 2, 3, 4, 5]
    assert (logits_of(merged, ids) - logits_of(base, ids)).abs().max() > 1e-3


def test_full_job_checkpoint_archive_is_sharded_and_zstd(jobs, data_dir, tmp_path):
    out = tmp_path / "full-step2.tar.zst"
    jobs.build(jobs.full, out, checkpoint="step-000000002",
                  shard_size="200KB")  # fmt: skip
    assert out.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    report = verify_archive(out, key=jobs.key.public)
    assert report.ok, report.problems
    import zstandard

    with open(out, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as reader:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            names = [m.name for m in tar]
    top = names[0]
    assert all(n == top or n.startswith(f"{top}/") for n in names) and names[1] == f"{top}/manifest.json"
    shards = [n for n in names if n.startswith(f"{top}/model/model-") and n.endswith(".safetensors")]
    assert len(shards) > 1 and f"{top}/model/model.safetensors.index.json" in names
    assert f"{top}/adapter" not in names

    # the checkpoint's weights, not the final ones
    final_out = tmp_path / "full-final.tar"
    jobs.build(jobs.full, final_out)
    from safetensors.torch import load_file

    refs = []
    for archive in (out, final_out):
        top_dir = _extract_any(archive, tmp_path / archive.name.replace(".", "-"))
        refs.append(load_file(top_dir / "verification" / "reference.safetensors")["logits"])
    assert (refs[0] - refs[1]).abs().max() > 1e-4


def _extract_any(archive: Path, dest: Path) -> Path:
    from finetune.archive.tarball import safe_extract

    dest.mkdir(parents=True)
    result = safe_extract(archive, dest)
    assert not result.problems and result.top
    return dest / result.top


@pytest.mark.parametrize("method", ["full", "lora"])
def test_zero3_checkpoint_of_the_last_step_is_the_final_model(zero3_jobs, jobs, data_dir, tmp_path, method):
    """A ZeRO-3 checkpoint (partitioned fp32 states, consolidated by DeepSpeed) gives the final model exactly."""
    from safetensors.torch import load_file

    job = zero3_jobs[method]
    marker = json.loads((job / "checkpoints" / "step-000000004" / "COMMITTED.json").read_text())
    assert marker["zero_stage"] == 3
    logits = []
    for name, checkpoint in (("final.tar", None), ("step4.tar", "step-000000004")):
        jobs.build(job, tmp_path / name, checkpoint=checkpoint)
        report = verify_archive(tmp_path / name, key=jobs.key.public)
        assert report.ok, report.problems
        top = _extract_any(tmp_path / name, tmp_path / name.replace(".", "-"))
        logits.append(load_file(top / "verification" / "reference.safetensors")["logits"])
    assert torch.equal(logits[0], logits[1])


def test_lora_merged_into_a_bf16_base_is_cast_back_within_the_stated_tolerance(jobs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    data_dir = tmp_path / "data"
    shutil.copytree(jobs.store, data_dir / "models")
    base = data_dir / "models" / "smollm2-135m-instruct" / "tiny-random"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(base)
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(data_dir))
    out = tmp_path / "bf16.tar"
    result = jobs.build(jobs.lora, out, store=data_dir / "models")
    assert result.manifest["weights_dtype"] == "bfloat16"
    assert result.manifest["verification"]["tolerance"]["merged"] == 5e-2
    assert 0 < result.manifest["verification"]["merged_deviation"] < 5e-2
    report = verify_archive(out, key=jobs.key.public)
    assert report.ok, report.problems
    [check] = [c for c in report.checks if c.startswith("model/: logits")]
    diff = float(check.split("max |diff| ")[1].split(",")[0])
    assert 0 < diff  # bf16 rounding is there, and within the tolerance (report.ok)
    top = _extract_any(out, tmp_path / "x")
    merged = AutoModelForCausalLM.from_pretrained(top / "model", local_files_only=True)
    assert merged.dtype == torch.bfloat16


def test_a_merged_model_that_is_off_is_never_shipped(jobs, data_dir, tmp_path, monkeypatch):
    """The build loads the merged model back and refuses it when its logits are not the engine's."""
    from safetensors.torch import load_file, save_file

    import finetune.archive.build as build

    def write_then_damage(model, dtype, tokenizer, src, dest, shard_size):  # a merge that forgot the scaling
        write_merged(model, dtype, tokenizer, src, dest, shard_size)
        weights = load_file(dest / "model.safetensors")
        key = next(k for k in weights if "mlp.down_proj" in k)
        weights[key] = weights[key] * 3
        save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})

    write_merged = build.write_merged
    monkeypatch.setattr(build, "write_merged", write_then_damage)
    with pytest.raises(ArchiveError, match="merged model's logits differ from the engine's"):
        jobs.build(jobs.lora, tmp_path / "off.tar")
    assert not list(tmp_path.iterdir())


def test_card_and_reports_hold_statistics_never_content(jobs, data_dir, tmp_path):
    out = tmp_path / "lora.tar"
    jobs.build(jobs.lora, out)
    top = _extract(out, tmp_path / "x")
    card = (top / "README.md").read_text()
    for expected in ("SmolLM2-135M-Instruct", "Hugging Face (US)", "Apache-2.0", "LoRA rank 8", "learning_rate: 0.01",
                     "evaluation loss", "rows used", "device-hours", "CPU run: no GPU-hours"):  # fmt: skip
        assert expected in card, expected
    rows = [json.loads(line) for line in (ROOT / "recipes" / "data" / "quickstart.jsonl").read_text().splitlines()]
    texts = [m["content"] for row in rows for m in row["messages"] if len(m["content"]) > 12]
    for name in ("README.md", "manifest.json", "data_stats.json", "metrics.jsonl", "recipe.json"):
        body = (top / name).read_text()
        assert not [t for t in texts if t in body], name


def test_usage_sums_every_run_of_a_resumed_job():
    gpu = {"device": "NVIDIA H100 80GB HBM3", "kind": "gpu", "count": 4}
    common = {"detail": "", "zero_stage": 0, "parameters": {}, "total_steps": 2}
    step = {"epoch": 0.5, "lr": 1e-4, "loss": 1.0, "trained_tokens": 1, "tokens": 1, "grad_norm": 1.0, "step_time": 1.0,
            "tokens_per_s": 1.0, "peak_memory": 0}  # fmt: skip
    summary = JobSummary(steps=2, preempted=False, stopped_early=False, final="final", zero_stage=0)
    events = [
        StartEvent(time=100.0, step=0, hardware=gpu, **common),
        StepEvent(time=160.0, step=1, **step),
        StepEvent(time=1900.0, step=2, **step),  # killed after this
        ResumeEvent(time=2000.0, step=1, hardware=gpu, checkpoint="step-000000001", **common),
        EndEvent(time=3700.0, step=2, summary=summary),
    ]
    use = usage(events, default_devices=1)
    assert use.seconds == pytest.approx(1800 + 1700) and use.segments == 2 and use.devices == 4
    assert use.gpu_hours == pytest.approx(3500 * 4 / 3600) and use.points == pytest.approx(2 * 3500 * 4 / 3600)
    cpu = usage([StartEvent(time=0.0, step=0, hardware={"kind": "cpu", "count": 2}, **common),
                 EndEvent(time=36.0, step=2, summary=summary)], default_devices=1)  # fmt: skip
    assert cpu.device_hours == pytest.approx(0.02) and cpu.points == 0


def test_refusals_say_what_to_do(jobs, data_dir, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(jobs.lora, unfinished)
    shutil.rmtree(unfinished / "final")
    with pytest.raises(
        ArchiveError, match=r"no final model that can be trusted .*; choose a checkpoint with --checkpoint \(step-"
    ):
        jobs.build(unfinished, tmp_path / "a.tar")
    with pytest.raises(ArchiveError, match="no checkpoint 'step-9'.*complete ones: step-"):
        jobs.build(jobs.lora, tmp_path / "a.tar", checkpoint="step-9")
    with pytest.raises(ArchiveError, match="no checkpoint '../final'"):
        jobs.build(jobs.lora, tmp_path / "a.tar", checkpoint="../final")
    with pytest.raises(ArchiveError, match="full fine-tuning job has no adapter"):
        jobs.build(jobs.full, tmp_path / "a.tar", contents="adapter")
    damaged = tmp_path / "damaged"
    shutil.copytree(jobs.lora, damaged)
    state = next((damaged / "checkpoints" / "step-000000002").rglob("*.pt"))
    state.write_bytes(state.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArchiveError, match="does not match its sha256 digest in the signed manifest"):
        jobs.build(damaged, tmp_path / "a.tar", checkpoint="step-000000002")  # fmt: skip
    assert not (tmp_path / "a.tar").exists() and not list(tmp_path.glob(".archive-*"))


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def _redigested(archive: Path, dest: Path) -> Path:
    """The tenant's attack: weights zeroed, their digest put in the manifest, the tar packed again."""
    import hashlib

    from safetensors.torch import load, save

    top = _extract(archive, dest.parent / "unpacked")
    weights = top / "model" / "model.safetensors"
    zeroed = save({k: v * 0 for k, v in load(weights.read_bytes()).items()})
    weights.write_bytes(zeroed)
    manifest = json.loads((top / "manifest.json").read_text())
    manifest["files"]["model/model.safetensors"] = {"size": len(zeroed), "sha256": hashlib.sha256(zeroed).hexdigest()}
    (top / "manifest.json").write_text(json.dumps(manifest))
    with tarfile.open(dest, "w") as tar:
        tar.add(top / "manifest.json", arcname=f"{top.name}/manifest.json")
        for path in sorted(top.rglob("*")):
            if path.name != "manifest.json":
                tar.add(path, arcname=f"{top.name}/{path.relative_to(top).as_posix()}", recursive=False)
    return dest


def test_cli_build_and_verify(jobs, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "cli.tar"
    job = tmp_path / "job"
    shutil.copytree(jobs.full, job)
    code, stdout, stderr = _cli("archive", "build", str(job), "--out", str(out), "--publish")
    assert code == 0, stderr
    assert "archive" in stdout and "finetune archive verify" in stdout
    published = json.loads((job / "archive" / "COMMITTED.json").read_text())
    assert published["kind"] == "archive" and published["files"]["cli.tar"]["size"] == out.stat().st_size
    code, stdout, _ = _cli("archive", "verify", str(out))
    assert code == 0 and stdout.strip().endswith(f"OK {out}")
    code, stdout, _ = _cli("archive", "verify", str(out), "--json")
    assert code == 0 and json.loads(stdout)["ok"] is True
    code, stdout, _ = _cli("archive", "verify", str(out), "--no-load")
    assert code == 0 and "note: models not loaded (--no-load)" in stdout and "logits" not in stdout

    # the published public key verifies it elsewhere; another key does not
    code, published_key, _ = _cli("archive", "public-key")
    assert code == 0 and published_key.strip() == jobs.key.public.base64()
    code, stdout, _ = _cli("archive", "verify", str(out), "--no-load", "--public-key", published_key.strip())
    assert code == 0 and stdout.strip().endswith(f"OK {out}")
    other = SigningKey.generate().public.base64()
    code, stdout, _ = _cli("archive", "verify", str(out), "--no-load", "--public-key", other)
    assert code == 2 and "manifest.json: signature: signed with another key" in stdout and "FAILED" in stdout
    code, _, stderr = _cli("archive", "verify", str(out), "--public-key", "not-a-key")
    assert code == 2 and "--public-key: not an Ed25519 public key" in stderr
    code, stdout, _ = _cli("archive", "verify", str(_redigested(out, tmp_path / "forged.tar")))
    assert code == 2 and "manifest.json: the signature does not match its content" in stdout
    broken = tmp_path / "broken.tar"
    broken.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    code, stdout, _ = _cli("archive", "verify", str(broken))
    assert code == 2 and "FAILED" in stdout
    code, _, stderr = _cli("archive", "build", str(tmp_path), "--out", str(tmp_path / "b.tar"))
    assert code == 1 and "not a job folder" in stderr
    code, _, stderr = _cli("archive", "build", str(job), "--out", str(tmp_path / "b.tar"), "--shard-size", "abc")
    assert code == 2 and "--shard-size: 'abc' is not a size" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "b.tar").exists()

    # where no platform key is at hand, the signature cannot be checked: a failure, and no key is made
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("FINETUNE_SIGNING_KEY", raising=False)
    code, stdout, _ = _cli("archive", "verify", str(out))
    assert code == 2 and "manifest.json: the signature could not be checked" in stdout
    assert not (tmp_path / "elsewhere").exists()
