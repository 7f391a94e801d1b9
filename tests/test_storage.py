"""Tenant buckets: the same tests on file:// and on S3 (a real S3-compatible server on loopback)."""

import json
import os
import uuid

import pytest

from finetune.storage import MARKER, Bucket, PathEscapeError, QuotaExceededError, StorageConfig, StorageError


@pytest.fixture(params=["file", "s3"])
def config(request, tmp_path):
    if request.param == "file":
        return StorageConfig(url=(tmp_path / "buckets").as_uri(), quota_bytes=10_000)
    s3 = request.getfixturevalue("s3_server")
    # each test gets its own prefix in the shared test bucket
    return StorageConfig(
        url=f"s3://{s3['bucket']}/{uuid.uuid4().hex}",
        quota_bytes=10_000,
        endpoint_url=s3["endpoint_url"],
        region=s3["region"],
        access_key_id=s3["access_key_id"],
        secret_access_key=s3["secret_access_key"],
    )


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


def test_publish_folder_writes_the_marker_last(bucket, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "weights.safetensors").write_bytes(b"w" * 100)
    (src / "sub" / "state.json").write_text("{}")
    manifest = bucket.publish_folder(src, "checkpoints/step-10")
    assert set(manifest["files"]) == {"weights.safetensors", "sub/state.json"}
    assert bucket.is_published("checkpoints/step-10")
    marker = json.loads(bucket.read_bytes(f"checkpoints/step-10/{MARKER}"))
    assert marker == manifest
    with pytest.raises(StorageError, match="already published"):
        bucket.publish_folder(src, "checkpoints/step-10")


def test_folder_without_marker_or_with_a_short_file_is_not_published(bucket, tmp_path):
    bucket.write_bytes("checkpoints/step-5/weights.safetensors", b"w" * 10)
    assert not bucket.is_published("checkpoints/step-5")
    src = tmp_path / "c"
    src.mkdir()
    (src / "w.safetensors").write_bytes(b"w" * 10)
    bucket.publish_folder(src, "checkpoints/step-6")
    bucket.write_bytes("checkpoints/step-6/w.safetensors", b"w" * 3)  # truncated after publication
    assert not bucket.is_published("checkpoints/step-6")


def test_ray_storage_points_into_the_bucket(bucket):
    path, fs = bucket.ray_storage("jobs/job-1/ray")
    assert path.endswith("/t1/2026q1/jobs/job-1/ray")
    with fs.open_output_stream(f"{path}/probe.txt") as out:
        out.write(b"ray was here")
    assert bucket.read_bytes("jobs/job-1/ray/probe.txt") == b"ray was here"


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
