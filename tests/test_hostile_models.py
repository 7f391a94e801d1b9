"""A hostile tenant's models: denied developers in disguise, unsafe custom folders trained without
review, links out of a snapshot, and safetensors headers built to break the reader."""

from __future__ import annotations

import json
import os
import random
import struct
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from finetune.errors import ModelCheckError, ModelStoreError
from finetune.loading import model_folder
from finetune.modelstore import check_folder, import_snapshot, scan_folder
from finetune.origin import Decision, OriginFacts, denied_entity, entity_is_denied, judge
from finetune.recipe import Recipe
from finetune.registry import ModelEntry, Registry
from finetune.reviews import (
    ReviewError,
    ReviewStatus,
    files_digest,
    find_review,
    record_review,
    review_command,
)
from finetune.safetensors_header import MAX_DEPTH, read_header_bytes, read_header_of
from finetune.storage import Bucket
from finetune.validate import validate_text

ARCH = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 16}
REV = "c" * 40
CYRILLIC_E = "\u0435"


def approved_entry() -> ModelEntry:
    return ModelEntry.model_validate(
        {
            "id": "demo-1b",
            "name": "Demo 1B",
            "status": "approved",
            "developer": {"entity": "Demo Labs", "country": "TW"},
            "source": {"repo": "demo/Demo-1B"},
            "architecture": ARCH,
            "chat": {"template": "t", "eos": "</s>", "eot": "</s>"},
            "components": [{"part": "base_weights", "entity": "Demo Labs", "country": "TW"}],
        }
    )


@pytest.fixture
def registry() -> Registry:
    return Registry([approved_entry()], {"t": "{{ messages }}"})


def make_model(folder: Path, seed: int = 0, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or ARCH))
    weights = np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32)
    save_file({"w": weights}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def safetensors_bytes(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


# ------------------------------------------------------------------------------ developer names

DISGUISED = [
    ("Deep Seek", "DeepSeek"),
    ("deep-seek", "DeepSeek"),
    ("DeepSeek", "DeepSeek"),
    (f"D{CYRILLIC_E}epseek", "DeepSeek"),  # a Cyrillic е
    ("ＤｅｅｐＳｅｅｋ", "DeepSeek"),  # fullwidth
    ("Deep\u200bSeek", "DeepSeek"),  # a zero-width space
    ("Dëepseek", "DeepSeek"),
    ("深度求索", "DeepSeek"),
    ("杭州深度求索人工智能基础技术研究有限公司", "DeepSeek"),
    ("阿里巴巴", "Alibaba Cloud"),
    ("通義千問", "Alibaba Cloud"),
    ("The Qwen Team", "Alibaba Cloud"),
    ("QwenTeam", "Alibaba Cloud"),
    ("Αlibaba Cloud", "Alibaba Cloud"),  # a Greek Alpha
    ("AIibaba Cloud", "Alibaba Cloud"),  # a capital I for the l
    ("智谱", "Zhipu AI"),
    ("Z.ai", "Zhipu AI"),
    ("百川", "Baichuan Inc."),
    ("月之暗面", "Moonshot AI"),
    ("騰訊", "Tencent"),
    ("字节跳动", "ByteDance"),
    ("零一萬物", "01.AI"),
    ("上海人工智能实验室", "Shanghai AI Laboratory"),
    ("稀宇科技", "MiniMax"),
    ("面壁智能", "OpenBMB"),
    ("ModelBest Inc.", "OpenBMB"),
]


@pytest.mark.parametrize(("name", "canonical"), DISGUISED, ids=[n for n, _ in DISGUISED])
def test_disguised_denied_developer_is_denied(name, canonical):
    assert denied_entity(name) == canonical
    verdict = judge(OriginFacts(name, "US"))
    assert verdict.decision is Decision.DENY
    assert verdict.reasons[0].startswith(f"developed by {name}")


@pytest.mark.parametrize(
    "name",
    ["Qwenfield Analytics", "Deep Seeker Inc", "阿里山科技", "MediaTek Research", "Taiwan AI Labs", "Moonshine Labs"],
)
def test_names_that_only_resemble_a_denied_developer_are_not_denied(name):
    assert not entity_is_denied(name)


@pytest.mark.parametrize(
    ("name", "denied"),
    [
        ("百川", True),
        ("百川 科技", True),
        ("百川智能科技", True),
        ("百川匯流科技", False),
        ("小米科技", True),
        ("小米粒工作室", False),
    ],
)
def test_chinese_names_that_are_common_words_count_only_as_whole_words(name, denied):
    assert entity_is_denied(name) is denied


def test_the_reason_names_the_developer_a_disguise_stands_for():
    [reason] = judge(OriginFacts("深度求索", "US")).reasons
    assert reason == "developed by 深度求索 (DeepSeek), a developer entity of PRC origin"


def custom_recipe_text(developer: str, country: str = "TW") -> str:
    return (
        f"model:\n  custom:\n    path: models/m\n    developer: {json.dumps(developer, ensure_ascii=False)}\n"
        f"    country: {country}\ndata:\n  path: data/train.jsonl\n"
    )


@pytest.mark.parametrize("developer", ["深度求索", "阿里巴巴", "The Qwen Team", "Deep Seek", f"D{CYRILLIC_E}epseek"])
def test_recipe_with_a_disguised_denied_developer_is_refused_at_the_developer(developer, registry):
    recipe, issues = validate_text(custom_recipe_text(developer), registry, file="r.yaml")
    assert recipe is None
    [issue] = issues
    assert (issue.file, issue.line, issue.path) == ("r.yaml", 4, "model.custom.developer")
    assert issue.message.startswith("this model is not allowed on this platform: developed by")


def test_recipe_declaring_the_prc_is_refused_at_the_country(registry):
    _, [issue] = validate_text(custom_recipe_text("Acme AI", "CN"), registry)
    assert issue.path == "model.custom.country" and "PRC origin" in issue.message


def test_unknown_developer_validates_but_is_only_pending(registry):
    recipe, issues = validate_text(custom_recipe_text("Acme AI"), registry)
    assert recipe is not None and issues == []
    assert judge(OriginFacts("Acme AI", "TW", declared_only=True)).decision is Decision.REVIEW


# ------------------------------------------------------------------------------ custom models


def custom_recipe(developer: str = "Acme AI", country: str = "TW") -> Recipe:
    return Recipe.model_validate(
        {"model": {"custom": {"path": "models/m", "developer": developer, "country": country}}, "data": {"path": "d"}}
    )


@pytest.fixture
def bucket(tmp_path) -> Bucket:
    return Bucket.folder(tmp_path / "bucket")


@pytest.fixture
def reviews(tmp_path) -> Path:
    return tmp_path / "data" / "reviews"


def upload(bucket: Bucket, **kw) -> Path:
    return make_model(Path(bucket.root) / "models" / "m", **kw)


def load(recipe, registry, tmp_path, bucket, reviews) -> Path:
    return model_folder(recipe, registry, tmp_path / "store", bucket, reviews=reviews)


def approve(folder: Path, registry: Registry, reviews: Path, developer: str = "Acme AI", **kw):
    report = check_folder(folder, developer, "TW", registry)
    kw = {"status": ReviewStatus.APPROVED, "reviewer": "ops-amy", "reason": "Acme's own pre-training", **kw}
    return record_review(reviews, report, **kw)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("modeling_acme.py", b"import os", "custom code is refused"),
        ("pytorch_model.bin", b"\x80\x04", "pickle weights are refused"),
        ("config.json", json.dumps({**ARCH, "auto_map": {"AutoModel": "m.M"}}).encode(), "custom code is refused"),
    ],
)
def test_unsafe_custom_model_is_refused_before_training(tmp_path, registry, bucket, reviews, name, content, message):
    folder = upload(bucket)
    approve(folder, registry, reviews)  # even an approved review of the safe files does not help
    (folder / name).write_bytes(content)
    with pytest.raises(ModelCheckError) as exc:
        load(custom_recipe(), registry, tmp_path, bucket, reviews)
    assert any(i.file == name and message in i.message for i in exc.value.issues)


def test_custom_model_with_weights_linked_outside_the_bucket_is_refused(tmp_path, registry, bucket, reviews):
    outside = make_model(tmp_path / "outside")
    folder = upload(bucket)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(ModelCheckError) as exc:
        load(custom_recipe(), registry, tmp_path, bucket, reviews)
    assert [(i.file, i.message.split(":")[0]) for i in exc.value.issues] == [("model.safetensors", "a link is refused")]


def test_custom_model_folder_reached_through_a_link_is_refused(tmp_path, registry, bucket, reviews):
    elsewhere = make_model(Path(bucket.root) / "other")
    (Path(bucket.root) / "models").mkdir(parents=True)
    (Path(bucket.root) / "models" / "m").symlink_to(elsewhere)
    with pytest.raises(ModelStoreError, match="goes through a link in your bucket"):
        load(custom_recipe(), registry, tmp_path, bucket, reviews)


def test_custom_model_with_a_pipe_is_refused(tmp_path, registry, bucket, reviews):
    folder = upload(bucket)
    os.mkfifo(folder / "vocab.txt")
    with pytest.raises(ModelCheckError) as exc:
        load(custom_recipe(), registry, tmp_path, bucket, reviews)
    assert [i.file for i in exc.value.issues] == ["vocab.txt"]


def test_custom_model_without_a_review_awaits_one(tmp_path, registry, bucket, reviews):
    folder = upload(bucket)
    with pytest.raises(ReviewError) as exc:
        load(custom_recipe(), registry, tmp_path, bucket, reviews)
    assert "custom model 'models/m' awaits origin review" in str(exc.value)
    assert review_command(folder, "Acme AI", "TW") in str(exc.value)
    assert isinstance(exc.value, ModelStoreError) and exc.value.fault == "tenant"


def test_approved_review_lets_exactly_those_files_train(tmp_path, registry, bucket, reviews):
    folder = upload(bucket)
    record = approve(folder, registry, reviews, now=datetime(2026, 12, 1, 9, 30, tzinfo=UTC))
    assert (reviews / f"{record.digest}.json").is_file()
    assert record.time == "2026-12-01T09:30:00Z" and record.reviewer == "ops-amy"
    assert load(custom_recipe(), registry, tmp_path, bucket, reviews) == folder
    assert find_review(reviews, scan_folder(folder)[0]) == record


def test_approved_review_of_other_files_does_not_count(tmp_path, registry, bucket, reviews):
    folder = upload(bucket)
    approve(make_model(tmp_path / "reviewed-elsewhere", seed=1), registry, reviews)
    with pytest.raises(ReviewError, match="awaits origin review"):
        load(custom_recipe(), registry, tmp_path, bucket, reviews)
    approve(folder, registry, reviews)
    make_model(folder, seed=2)  # weights swapped after the review
    with pytest.raises(ReviewError, match="awaits origin review"):
        load(custom_recipe(), registry, tmp_path, bucket, reviews)


def test_pending_and_denied_reviews_do_not_let_a_model_train(tmp_path, registry, bucket, reviews):
    folder = upload(bucket)
    approve(folder, registry, reviews, status=ReviewStatus.PENDING, reason="asked Acme for the training report")
    with pytest.raises(ReviewError, match="awaits origin review"):
        load(custom_recipe(), registry, tmp_path, bucket, reviews)
    record = approve(folder, registry, reviews, status=ReviewStatus.DENIED, reason="a fine-tune of a PRC model")
    assert [h.status for h in record.history] == [ReviewStatus.PENDING]
    with pytest.raises(ReviewError, match="was denied on review .*: a fine-tune of a PRC model"):
        load(custom_recipe(), registry, tmp_path, bucket, reviews)


def test_a_review_holds_only_for_the_developer_it_found(tmp_path, registry, bucket, reviews):
    approve(upload(bucket), registry, reviews)
    with pytest.raises(ReviewError, match="approved as developed by Acme AI .TW., but the recipe declares Other"):
        load(custom_recipe("Other Labs"), registry, tmp_path, bucket, reviews)
    assert load(custom_recipe("ACME  ai"), registry, tmp_path, bucket, reviews)  # the same name, spelled loosely


def test_denied_developer_is_refused_at_load_even_with_a_review_on_file(tmp_path, registry, bucket, reviews):
    approve(upload(bucket), registry, reviews)
    with pytest.raises(ReviewError, match="not allowed on this platform: developed by 深度求索 .DeepSeek."):
        load(custom_recipe("深度求索"), registry, tmp_path, bucket, reviews)


def test_the_policy_denial_cannot_be_approved(tmp_path, registry, reviews):
    folder = make_model(tmp_path / "m")
    with pytest.raises(ModelStoreError, match="cannot be approved: the origin policy denies it"):
        approve(folder, registry, reviews, developer="The Qwen Team")
    with pytest.raises(ModelStoreError, match="reason"):
        approve(folder, registry, reviews, reason="  ")
    assert not reviews.exists()


def test_an_edited_review_record_is_refused(tmp_path, registry, bucket, reviews):
    folder = upload(bucket)
    record = approve(folder, registry, reviews)
    path = reviews / f"{record.digest}.json"
    data = json.loads(path.read_text())
    data["files"]["extra.json"] = {"sha256": "0" * 64, "size": 1}
    path.write_text(json.dumps(data))
    with pytest.raises(ModelStoreError, match="does not list the files it is filed under"):
        load(custom_recipe(), registry, tmp_path, bucket, reviews)
    path.write_text("{not json")
    with pytest.raises(ModelStoreError, match="is damaged"):
        load(custom_recipe(), registry, tmp_path, bucket, reviews)


def test_the_review_key_covers_names_and_contents(tmp_path):
    files, _ = scan_folder(make_model(tmp_path / "a"))
    renamed = {("weights.safetensors" if n == "model.safetensors" else n): d for n, d in files.items()}
    assert files_digest(files) != files_digest(renamed)
    assert files_digest(files) == files_digest(dict(reversed(list(files.items()))))


# ------------------------------------------------------------------------------ links out of a snapshot


def test_import_refuses_a_weight_file_linked_to_etc_passwd(tmp_path, registry):
    snap = make_model(tmp_path / REV)
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to("/etc/passwd")
    store, lock = tmp_path / "store", tmp_path / "store" / "models.lock.json"
    with pytest.raises(ModelCheckError) as exc:
        import_snapshot(snap, "demo-1b", registry, store, lock)
    assert exc.value.issues[0].file == "model.safetensors"
    assert exc.value.issues[0].message.startswith("a link is refused")
    assert not store.exists() and not lock.exists()


def test_import_refuses_a_cache_link_leaving_the_blob_folder(tmp_path, registry):
    repo = tmp_path / "hub" / "models--demo--Demo-1B"
    blobs = make_model(repo / "blobs")
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to(blobs / "config.json")
    (snap / "model.safetensors").symlink_to(blobs / "model.safetensors")
    (snap / "tokenizer.json").symlink_to("/etc/passwd")
    store, lock = tmp_path / "store", tmp_path / "store" / "models.lock.json"
    with pytest.raises(ModelCheckError) as exc:
        import_snapshot(snap, "demo-1b", registry, store, lock)
    [issue] = exc.value.issues
    assert issue.file == "tokenizer.json" and "links outside the cache's blob folder" in issue.message
    assert not store.exists() and not lock.exists()
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(blobs / "tokenizer.json")  # the cache's own layout still imports
    dest = import_snapshot(snap, "demo-1b", registry, store, lock)
    assert not any(p.is_symlink() for p in dest.iterdir())


def test_check_refuses_links_and_linked_folders_by_name(tmp_path, registry):
    folder = make_model(tmp_path / "upload")
    (folder / "secrets").symlink_to("/etc")
    (folder / "extra.json").symlink_to("/etc/passwd")
    with pytest.raises(ModelCheckError) as exc:
        check_folder(folder, "Acme AI", "TW", registry)
    assert sorted(str(i.file) for i in exc.value.issues) == ["extra.json", "secrets"]


def test_a_config_nested_100k_deep_is_refused_without_a_traceback(tmp_path, registry):
    folder = make_model(tmp_path / "upload")
    (folder / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ModelCheckError) as exc:
        check_folder(folder, "Acme AI", "TW", registry)
    assert [str(i.file) for i in exc.value.issues] == ["config.json"]


# ------------------------------------------------------------------------------ safetensors headers

GOOD_HEADER = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}

BAD_FILES = {
    "length 2^60": (safetensors_bytes(GOOD_HEADER, bytes(16), length=2**60), "header length 1152921504606846976"),
    "offset 10^15": (
        safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [10**15, 10**15 + 16]}}, bytes(16)),
        "is not within the 16 data bytes",
    ),
    "non-JSON header": (safetensors_bytes(b"{this is not json}", bytes(16)), "header is not valid JSON"),
    "not an object": (safetensors_bytes(b"[1, 2]", b""), "header is not a JSON object"),
    "overlapping offsets": (
        safetensors_bytes(
            {
                "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
            },
            bytes(16),
        ),
        "overlaps tensor 'a'",
    ),
    "size mismatch": (
        safetensors_bytes({"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, bytes(16)),
        "holds 16 bytes but F32 of shape [3, 2] needs 24",
    ),
    "gap": (
        safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)),
        "leaves a gap of 8 bytes",
    ),
    "trailing data": (safetensors_bytes(GOOD_HEADER, bytes(20)), "tensors cover 16 of the 20 data bytes"),
    "unknown dtype": (
        safetensors_bytes({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        "unknown dtype 'F128'",
    ),
    "deep nesting": (safetensors_bytes(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", b""), "nests 5001 deep"),
    "duplicate name": (
        safetensors_bytes(
            b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            bytes(1),
        ),
        "duplicate key 'w'",
    ),
    "short file": (b"\x01\x02", "shorter than the 8-byte header length"),
    "not UTF-8": (safetensors_bytes(b'{"\xff": 1}', b""), "header is not UTF-8 text"),
    "metadata not strings": (
        safetensors_bytes({"__metadata__": {"format": 1}, **GOOD_HEADER}, bytes(16)),
        "__metadata__: must map names to strings",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_safetensors_header_refuses_the_folder_naming_the_file(tmp_path, registry, case):
    blob, message = BAD_FILES[case]
    folder = make_model(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(blob)
    with pytest.raises(ModelCheckError) as exc:
        check_folder(folder, "Acme AI", "TW", registry)
    issues = exc.value.issues
    assert {i.file for i in issues} == {"model.safetensors"}
    assert any(message in str(i) for i in issues), [str(i) for i in issues]


def test_a_sound_header_is_summarised():
    header = {
        "__metadata__": {"format": "pt"},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "empty": {"dtype": "U8", "shape": [0], "data_offsets": [22, 22]},
    }
    summary, problems = read_header_bytes(safetensors_bytes(header, bytes(22)), "x.safetensors")
    assert problems == [] and summary is not None
    assert [t.name for t in summary.tensors] == ["a", "b", "empty"]
    assert summary.parameters == 7 and summary.dtypes == {"F32": 1, "BF16": 1, "U8": 1}
    assert summary.metadata == {"format": "pt"}


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < MAX_DEPTH + 2 else 4)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 2**64, 10**15, rng.randrange(-(10**6), 10**6)])
    if kind == 2:
        return rng.random() * rng.choice([1, 1e300])
    if kind == 3:
        return rng.choice(["F32", "BF16", "U8", "dtype", "shape", "data_offsets", "", "\u0000", "深度"])
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["dtype", "shape", "data_offsets", "__metadata__", "w", "x"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def _random_tensor_file(rng: random.Random) -> bytes:
    header, offset = {}, 0
    for i in range(rng.randrange(4)):
        shape = [rng.randrange(3) for _ in range(rng.randrange(3))]
        dtype = rng.choice(["F32", "BF16", "U8", "I64"])
        size = int(np.prod(shape, dtype=np.int64)) * {"F32": 4, "BF16": 2, "U8": 1, "I64": 8}[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return safetensors_bytes(header, bytes(offset))


def _mutate(rng: random.Random, blob: bytes) -> bytes:
    data = bytearray(blob)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(3)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        elif data:
            del data[rng.randrange(len(data))]
    return bytes(data)


def test_fuzzed_headers_give_located_problems_and_never_raise(tmp_path):
    rng = random.Random(20261201)
    accepted = 0
    for n in range(4000):
        shape = n % 4
        if shape == 0:
            blob = rng.randbytes(rng.randrange(64))
        elif shape == 1:
            raw = json.dumps(_random_json(rng)).encode()
            blob = safetensors_bytes(raw, rng.randbytes(rng.randrange(32)), length=rng.choice([None, len(raw)]))
        elif shape == 2:
            blob = _mutate(rng, _random_tensor_file(rng))
        else:
            blob = _random_tensor_file(rng)
        summary, problems = read_header_bytes(blob, "f.safetensors")
        assert (summary is None) == bool(problems)
        assert all(p.file == "f.safetensors" and p.message for p in problems)
        if summary is not None and n % 3 == 0:  # what it accepts, the reference loader opens
            path = tmp_path / "f.safetensors"
            path.write_bytes(blob)
            with safe_open(str(path), "np") as fh:
                assert sorted(fh.keys()) == sorted(t.name for t in summary.tensors)
            accepted += 1
        if shape == 3:
            assert problems == []
    assert accepted > 150


def test_a_header_beyond_the_limit_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", 100_000_001))
        fh.truncate(100_000_100)  # sparse: nothing is written, nothing should be read
    summary, [problem] = read_header_of(path, "big.safetensors")
    assert summary is None
    assert problem.message.startswith("header length 100000001 is more than the 100000000 bytes allowed")
