"""The offline model store: refusing unsafe folders, reviewing custom models, importing snapshots."""

import json

import pytest
import torch
from safetensors.torch import save_file

from finetune.errors import ModelCheckError, ModelStoreError
from finetune.modelstore import check_folder, import_snapshot, resolve_model, scan_folder
from finetune.registry import ModelEntry, Registry, apply_lock

ARCH = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 16}
REV = "a" * 40


def entry(**kw) -> ModelEntry:
    base = {
        "id": "demo-1b",
        "name": "Demo 1B",
        "status": "approved",
        "developer": {"entity": "Demo Labs", "country": "TW"},
        "source": {"repo": "demo/Demo-1B"},
        "architecture": ARCH,
        "chat": {"template": "t", "eos": "</s>", "eot": "</s>"},
        "components": [{"part": "base_weights", "entity": "Demo Labs", "country": "TW"}],
    }
    return ModelEntry.model_validate({**base, **kw})


def registry(*entries: ModelEntry) -> Registry:
    return Registry(list(entries), {"t": "{{ messages }}"})


def make_model(folder, seed=0, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or ARCH))
    torch.manual_seed(seed)
    save_file({"w": torch.randn(4, 4)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("pytorch_model.bin", b"x", "pickle weights are refused: loading them can run code"),
        ("optimizer.pt", b"x", "pickle weights are refused: loading them can run code"),
        ("extra.pkl", b"x", "pickle weights are refused: loading them can run code"),
        ("modeling_demo.py", b"import os", "custom code is refused: models must load with stock transformers"),
    ],
)
def test_unsafe_files_are_refused(tmp_path, name, content, message):
    folder = make_model(tmp_path / "m")
    (folder / name).write_bytes(content)
    _, issues = scan_folder(folder)
    assert [(i.file, i.message) for i in issues] == [(name, message)]


def test_auto_map_is_refused(tmp_path):
    folder = make_model(tmp_path / "m", config={**ARCH, "auto_map": {"AutoModel": "modeling.Demo"}})
    _, issues = scan_folder(folder)
    assert [str(i) for i in issues] == [
        "config.json: auto_map: custom code is refused: the config asks for remote code"
    ]


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _, issues = scan_folder(tmp_path)
    assert [i.message for i in issues] == ["no .safetensors weights found"]


def test_custom_model_gets_a_pending_review_record(tmp_path):
    report = check_folder(make_model(tmp_path / "m"), "Acme AI", "tw", registry(entry()))
    assert report.status == "pending"
    assert report.country == "TW"
    assert set(report.files) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert report.verdict.reasons == ["origin is declared by the uploader and not yet verified"]


def test_custom_model_declared_from_prc_is_denied(tmp_path):
    report = check_folder(make_model(tmp_path / "m"), "Zhipu AI", "SG", registry(entry()))
    assert report.status == "denied"


def test_renamed_denied_checkpoint_is_caught_by_digest(tmp_path):
    original = make_model(tmp_path / "denied-original")
    files, _ = scan_folder(original)
    denied = entry(
        id="bad-7b",
        status="denied",
        reason="PRC developer",
        developer={"entity": "01.AI", "country": "CN"},
        components=[],
        files=files,
    )
    renamed = tmp_path / "totally-new-model"
    original.rename(renamed)
    report = check_folder(renamed, "Totally New Labs", "TW", registry(entry(), denied))
    assert report.status == "denied"
    assert "weight files are identical to denied model 'bad-7b'" in report.verdict.reasons


def test_denied_family_architecture_sends_to_review_only(tmp_path):
    family = entry(
        id="qwen",
        kind="family",
        status="denied",
        reason="Alibaba (CN)",
        repos=["Qwen/*"],
        developer={"entity": "Alibaba Cloud", "country": "CN"},
        model_types=["qwen2"],
        source=None,
        architecture=None,
        chat=None,
        components=[],
    )
    folder = make_model(tmp_path / "colqwen", config={**ARCH, "model_type": "qwen2"})
    report = check_folder(folder, "Illuin Technology", "FR", registry(entry(), family))
    assert report.status == "pending"
    assert any("architecture 'qwen2' is that of the denied family 'qwen'" in r for r in report.verdict.reasons)


def test_import_pins_digests_then_verifies_them(tmp_path):
    reg = registry(entry())
    store, lock = tmp_path / "store", tmp_path / "store" / "models.lock.json"
    snap = make_model(tmp_path / "snapshots" / REV)
    dest = import_snapshot(snap, "demo-1b", reg, store, lock)
    assert dest == store / "demo-1b" / REV
    assert (dest / "model.safetensors").read_bytes() == (snap / "model.safetensors").read_bytes()
    pinned = json.loads(lock.read_text())["models"]["demo-1b"]
    assert pinned["revision"] == REV and set(pinned["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}

    reloaded = Registry([entry()], {"t": ""})
    merged, issues = apply_lock(list(reloaded), lock)
    assert issues == [] and merged[0].source.revision == REV and merged[0].files
    reg2 = Registry(merged, {"t": ""})
    assert resolve_model(reg2, "demo-1b", store) == dest

    tampered = make_model(tmp_path / "tampered" / REV, seed=1)
    with pytest.raises(ModelStoreError, match="does not match its pinned digests: model.safetensors"):
        import_snapshot(tampered, "demo-1b", reg2, tmp_path / "store2", lock)


def test_import_refuses_a_snapshot_that_is_not_the_model(tmp_path):
    snap = make_model(tmp_path / REV, config={**ARCH, "hidden_size": 4096})
    with pytest.raises(ModelCheckError) as exc:
        import_snapshot(snap, "demo-1b", registry(entry()), tmp_path / "s", tmp_path / "l.json")
    assert str(exc.value.issues[0]) == (
        "config.json:hidden_size: is 4096 but registry entry 'demo-1b' says 8 "
        "(hint: this is not that model, or the registry entry needs correcting)"
    )


def test_import_needs_a_revision_and_an_approved_entry(tmp_path):
    snap = make_model(tmp_path / "snap")
    with pytest.raises(ModelStoreError, match="pass --revision"):
        import_snapshot(snap, "demo-1b", registry(entry()), tmp_path / "s", tmp_path / "l.json")
    pending = entry(status="pending", reason="under review")
    with pytest.raises(ModelStoreError, match="only approved models are imported"):
        import_snapshot(snap, "demo-1b", registry(pending), tmp_path / "s", tmp_path / "l.json", REV)
    with pytest.raises(ModelStoreError, match="pinned to revision"):
        pinned = entry(source={"repo": "demo/Demo-1B", "revision": "b" * 40})
        import_snapshot(snap, "demo-1b", registry(pinned), tmp_path / "s", tmp_path / "l.json", REV)


def test_import_follows_hub_cache_links(tmp_path):
    blobs = make_model(tmp_path / "blobs")
    snap = tmp_path / "snapshots" / REV
    snap.mkdir(parents=True)
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    dest = import_snapshot(snap, "demo-1b", registry(entry()), tmp_path / "s", tmp_path / "l.json")
    assert not (dest / "model.safetensors").is_symlink()


def test_only_a_cache_snapshot_may_link_and_only_into_its_blobs(tmp_path):
    blobs = make_model(tmp_path / "blobs")
    snap = tmp_path / "snapshots" / REV
    snap.mkdir(parents=True)
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    assert scan_folder(snap, cache_links=True)[1] == []
    refused = [(i.file, i.message.split(":")[0]) for i in scan_folder(snap)[1]]
    assert refused == [(name, "a link is refused") for name in ("config.json", "model.safetensors", "tokenizer.json")]
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    [issue] = scan_folder(snap, cache_links=True)[1]
    assert issue.file == "tokenizer.json" and issue.message.startswith("links outside the cache's blob folder")


def test_missing_model_names_the_command_that_fixes_it(tmp_path):
    with pytest.raises(ModelStoreError, match="has not been imported: run `finetune models import"):
        resolve_model(registry(entry()), "demo-1b", tmp_path)
    with pytest.raises(ModelStoreError, match="finetune models materialize demo-1b --tiny"):
        resolve_model(registry(entry()), "demo-1b", tmp_path, tiny=True)
