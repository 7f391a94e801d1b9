"""Tenant buckets: the same tests on file:// and on S3 (a real S3-compatible server on loopback)."""

import dataclasses
import json
import os

import pytest

from finetune.published import MARKER, FolderRefused, fetch_folder, publish_folder, read_marker, remove_folder
from finetune.settings import Settings
from finetune.signing import SigningKey
from finetune.storage import Bucket, PathEscapeError, QuotaExceededError, StorageConfig, StorageError

KEY = SigningKey.generate()


@pytest.fixture(params=["file", "s3"])
def config(request, tmp_path):
    if request.param == "file":
        return StorageConfig(url=(tmp_path / "buckets").as_uri(), quota_bytes=10_000)
    # each test gets its own prefix in the shared test bucket
    return dataclasses.replace(request.getfixturevalue("s3_storage")(), quota_bytes=10_000)


@pytest.fixture
def bucket(config):
    return Bucket(config, "t1", "2026q1")


def test_write_read_list_remove(bucket):
    bucket.write_bytes("data/train.jsonl", "臺灣 🚀\n".encode())
    bucket.write_bytes("data/eval/e.jsonl", b"{}\n")
    assert bucket.read_bytes("data/train.jsonl").decode() == "臺灣 🚀\n"
    assert bucket.exists("data/train.jsonl") and not bucket.exists("data/nope.jsonl")
    assert bucket.size("data/eval/e.jsonl") == 3
    assert bucket.list("data") == ["data/eval", "data/train.jsonl"]
    assert bucket.list(recursive=True) == ["data/eval/e.jsonl", "data/train.jsonl"]
    with bucket.open("data/train.jsonl") as fh:
        assert fh.read(3) == "臺".encode()
    bucket.remove("data/eval", recursive=True)
    assert bucket.list(recursive=True) == ["data/train.jsonl"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../t10/2026q1/data.jsonl", "must not contain '..'"),
        ("data/../../t10/x", "must not contain '..'"),
        ("/etc/passwd", "not an absolute path"),
        ("data\\..\\x", "not '\\'"),
        ("s3://other-bucket/x", "without a scheme"),
        ("data/\x00x", "control characters"),
        ("", "must not be empty"),
    ],
)
def test_escapes_are_refused_before_any_io(bucket, path, message):
    with pytest.raises(PathEscapeError, match=message.replace("\\", "\\\\")):
        bucket.read_bytes(path)
    with pytest.raises(PathEscapeError):
        bucket.write_bytes(path, b"x")


def test_tenant_prefixes_never_collide(config):
    t1, t10 = Bucket(config, "t1", "2026q1"), Bucket(config, "t10", "2026q1")
    t10.write_bytes("secret.txt", b"t10's data")
    t1.write_bytes("mine.txt", b"t1's data")
    assert t1.list(recursive=True) == ["mine.txt"]
    assert t10.list(recursive=True) == ["secret.txt"]
    assert not t1.exists("secret.txt")
    other_term = Bucket(config, "t1", "2026q2")
    assert other_term.list(recursive=True) == []


def test_ids_are_validated(config):
    for tenant in ("T1", "t1/..", "", "../x", "a" * 70):
        with pytest.raises(StorageError, match="invalid tenant id"):
            Bucket(config, tenant, "2026q1")


def test_quota_is_enforced_before_writing(bucket, tmp_path):
    bucket.write_bytes("a.bin", b"x" * 6_000)
    with pytest.raises(QuotaExceededError, match="would exceed the storage quota of 10.0 KB"):
        bucket.write_bytes("b.bin", b"x" * 5_000)
    assert not bucket.exists("b.bin")
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 5_000)
    with pytest.raises(QuotaExceededError):
        bucket.upload(big, "big.bin")
    assert bucket.usage() == 6_000


def _folder(tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True, exist_ok=True)
    (src / "weights.safetensors").write_bytes(b"w" * 100)
    (src / "sub" / "state.json").write_text("{}")
    return src


def test_publish_folder_writes_the_signed_manifest_last(bucket, tmp_path):
    manifest = publish_folder(bucket, _folder(tmp_path), "jobs/j/final", "final", {"step": 3}, KEY)
    assert set(manifest["files"]) == {"weights.safetensors", "sub/state.json"}
    assert read_marker(bucket, "jobs/j/final", "final", KEY.public) == manifest
    assert json.loads(bucket.read_bytes(f"jobs/j/final/{MARKER}"))["signature"]["key_id"] == KEY.key_id
    with pytest.raises(StorageError, match="already published"):
        publish_folder(bucket, _folder(tmp_path), "jobs/j/final", "final", {}, KEY)
    with pytest.raises(FolderRefused, match="not a published checkpoint"):
        read_marker(bucket, "jobs/j/final", "checkpoint", KEY.public)
    fetch_folder(bucket, "jobs/j/final", manifest, tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "state.json").read_text() == "{}"


def test_a_folder_without_manifest_or_altered_after_it_is_refused(bucket, tmp_path):
    bucket.write_bytes("c/step-5/weights.safetensors", b"w" * 10)
    with pytest.raises(FolderRefused, match="cut off before its commit"):
        read_marker(bucket, "c/step-5", "checkpoint", KEY.public)
    manifest = publish_folder(bucket, _folder(tmp_path), "c/step-6", "checkpoint", {}, KEY)
    bucket.write_bytes("c/step-6/weights.safetensors", b"W" * 100)  # same size, other bytes
    read_marker(bucket, "c/step-6", "checkpoint", KEY.public)  # sizes agree: caught by the digest when fetched
    with pytest.raises(FolderRefused, match="'weights.safetensors' does not match its sha256"):
        fetch_folder(bucket, "c/step-6", manifest, tmp_path / "copy")
    assert not (tmp_path / "copy" / "weights.safetensors").exists()
    bucket.write_bytes("c/step-6/weights.safetensors", b"w" * 4000)  # larger than listed
    with pytest.raises(FolderRefused, match="has 4000 bytes, the manifest lists 100"):
        read_marker(bucket, "c/step-6", "checkpoint", KEY.public)
    remove_folder(bucket, "c/step-6")
    assert bucket.list("c") == ["c/step-5"]


def test_downloads_stop_at_the_expected_size(bucket, tmp_path):
    bucket.write_bytes("big.bin", b"x" * 5_000)
    with pytest.raises(StorageError, match="more than the 100 bytes expected"):
        bucket.download("big.bin", tmp_path / "big.bin", max_bytes=100)
    assert (tmp_path / "big.bin").stat().st_size <= 8 * 1024 * 1024


def test_move_uploads_leave_nothing_behind(bucket, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    bucket.upload(src, "x/a.bin", move=True)
    assert not src.exists() and bucket.read_bytes("x/a.bin") == b"abc"


def test_a_bucket_travels_as_a_reference_without_credentials(config, tmp_path):
    bucket = Bucket(config, "t1", "2026q1")
    bucket.write_bytes("probe.txt", b"here")
    ref = bucket.ref()
    assert "testing" not in ref.model_dump_json() and ref.tenant == "t1"
    settings = Settings(
        data_dir=tmp_path, s3_access_key_id=config.access_key_id, s3_secret_access_key=config.secret_access_key
    )
    assert Bucket.from_ref(ref, settings).read_bytes("probe.txt") == b"here"
    folder = Bucket.folder(tmp_path / "job 臺灣 100%")  # spaces, CJK and '%' survive the file:// URL
    assert Bucket.from_ref(folder.ref(), settings).root == folder.root


def test_links_out_of_a_local_bucket_are_refused(tmp_path):
    config = StorageConfig(url=(tmp_path / "buckets").as_uri())
    bucket = Bucket(config, "t1", "2026q1")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    bucket.write_bytes("keep.txt", b"x")
    os.symlink(outside, bucket.local_path("data"))
    with pytest.raises(PathEscapeError, match="leads outside your bucket through a link"):
        bucket.read_bytes("data/secret.txt")
    os.symlink(tmp_path / "buckets" / "t10", bucket.local_path("neighbour"))
    with pytest.raises(PathEscapeError):
        bucket.exists("neighbour")


def test_a_plain_folder_can_act_as_the_bucket(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    bucket = Bucket.folder(tmp_path)
    assert bucket.list(recursive=True) == ["data/train.jsonl"]
    assert bucket.local_path("data/train.jsonl") == tmp_path / "data" / "train.jsonl"
    with pytest.raises(PathEscapeError):
        bucket.read_bytes("../outside")


def test_a_data_folder_with_spaces_and_cjk_keeps_its_buckets_inside_it(tmp_path):
    data = tmp_path / "資料 100%"
    bucket = Bucket.for_tenant(Settings(data_dir=data), "t1", "2026q1")
    bucket.write_bytes("x.txt", b"x")
    assert (data / "buckets" / "t1" / "2026q1" / "x.txt").read_bytes() == b"x"
