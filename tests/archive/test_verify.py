"""Verification catches tampering, naming the file: a flipped byte, a removed or added file, unsafe members,
a manifest re-digested or malformed, an archive that would write more than it declares."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune.archive import verify_archive
from finetune.archive.layout import member_problem, parse_size
from finetune.signing import SigningKey, sign_document

Member = tuple[tarfile.TarInfo, bytes | None]


@pytest.fixture(scope="module")
def built(jobs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "lora.tar"
    jobs.build(jobs.lora, out)
    return out


@pytest.fixture(scope="module")
def key(jobs) -> SigningKey:
    return jobs.key


def _members(archive: Path) -> list[Member]:
    members: list[Member] = []
    with tarfile.open(archive) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read() if info.isreg() else None  # type: ignore[union-attr]
            members.append((info, data))
    return members


def _tar_bytes(members: list[Member], *, end: bool = True) -> bytes:
    """The members as a tar file; without ``end``, without its end-of-archive blocks (more can follow)."""
    buffer = io.BytesIO()
    tar = tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT)
    for info, data in members:
        if data is not None:
            info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if data is not None else None)
    if end:
        tar.close()
    return buffer.getvalue()


def _rewrite(archive: Path, dest: Path, change: Callable[[list[Member]], list[Member]]) -> Path:
    dest.write_bytes(_tar_bytes(change(_members(archive))))
    return dest


def _zstd(data: bytes, dest: Path) -> Path:
    import zstandard

    dest.write_bytes(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data))
    return dest


def _file(name: str, data: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _manifest_edit(
    change: Callable[[dict[str, Any]], Any], *, sign: SigningKey | None = None, files: dict[str, bytes] | None = None
) -> Callable[[list[Member]], list[Member]]:
    """Replace files (``files``, by name under the top folder), re-digest them in the manifest, let
    ``change`` alter the manifest in place and, with ``sign``, sign it again (an insider's forgery)."""

    def edit(members: list[Member]) -> list[Member]:
        top = members[0][0].name
        replaced = {f"{top}/{name}": data for name, data in (files or {}).items()}
        manifest = json.loads(next(data for info, data in members if info.name == f"{top}/manifest.json") or b"")
        for name, data in (files or {}).items():
            manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        change(manifest)
        if sign is not None:
            manifest = sign_document(manifest, sign)
        replaced[f"{top}/manifest.json"] = json.dumps(manifest).encode()
        known = {info.name for info, _ in members}
        added = [_file(name, data) for name, data in replaced.items() if name not in known]
        return [(info, replaced.get(info.name, data)) for info, data in members] + added

    return edit


def _problems(archive: Path, key: SigningKey, **options: Any) -> dict[str, str]:
    report = verify_archive(archive, key=key.public, **options)
    assert not report.ok
    return {p.file: p.message for p in report.problems}


def _weights(members: list[Member], change: Callable[[Any], Any]) -> bytes:
    from safetensors.torch import load, save

    top = members[0][0].name
    tensors = load(next(data for info, data in members if info.name == f"{top}/model/model.safetensors") or b"")
    return save(change(tensors), metadata={"format": "pt"})


def _scaled(tensors: dict[str, Any]) -> dict[str, Any]:
    name = next(k for k in tensors if "mlp.down_proj" in k)
    return {**tensors, name: tensors[name] * 1.5}


def test_untouched_archive_verifies(built, key, data_dir):
    report = verify_archive(built, key=key.public)
    assert report.ok, report.problems
    assert any("carries the platform's signature" in c for c in report.checks)
    names = [info.name for info, _ in _members(built)]
    assert names[1] == f"{names[0]}/manifest.json"  # first: its sizes bound every member after it


def test_one_flipped_byte_is_found(built, key, data_dir, tmp_path):
    def flip(members: list[Member]) -> list[Member]:
        out = []
        for info, data in members:
            if info.name.endswith("model/model.safetensors") and data is not None:
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]
            out.append((info, data))
        return out

    problems = _problems(_rewrite(built, tmp_path / "t.tar", flip), key)
    assert list(problems) == ["model/model.safetensors"] and "sha256 differs" in problems["model/model.safetensors"]
    notes = verify_archive(tmp_path / "t.tar", key=key.public).notes
    assert "not loaded, its files failed the integrity check" in " ".join(notes)


def test_removed_file_is_found(built, key, data_dir, tmp_path):
    keep = lambda ms: [m for m in ms if not m[0].name.endswith("tokenizer.json")]  # noqa: E731
    removed = _rewrite(built, tmp_path / "t.tar", keep)
    problems = _problems(removed, key, load=False)
    assert set(problems) == {"model/tokenizer.json", "adapter/tokenizer.json"}
    assert all("missing" in m for m in problems.values())


def test_added_file_is_found(built, key, data_dir, tmp_path):
    top = _members(built)[0][0].name
    added = _rewrite(built, tmp_path / "t.tar", lambda ms: [*ms, _file(f"{top}/model/extra.py", b"print(1)\n")])
    problems = _problems(added, key, load=False)
    assert list(problems) == ["model/extra.py"] and "not listed in the manifest" in problems["model/extra.py"]


@pytest.mark.parametrize("name", ["../x", "{top}/../../x", "/tmp/finetune-abs-x", "{top}/a\\b"])
def test_unsafe_member_names_are_refused_and_never_written(built, key, data_dir, tmp_path, name):
    top = _members(built)[0][0].name
    name = name.format(top=top)
    (tmp_path / "work").mkdir()
    evil = _rewrite(built, tmp_path / "work" / "t.tar", lambda ms: [*ms, _file(name, b"escaped")])
    problems = _problems(evil, key, load=False)
    assert list(problems) == [name] and problems[name].startswith("refused:")
    assert not (tmp_path / "x").exists() and not (tmp_path / "work" / "x").exists()
    assert not Path("/tmp/finetune-abs-x").exists()


def test_links_and_devices_are_refused(built, key, data_dir, tmp_path):
    top = _members(built)[0][0].name

    def add(members: list[Member]) -> list[Member]:
        link = tarfile.TarInfo(f"{top}/model/link.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        hard = tarfile.TarInfo(f"{top}/model/hard.json")
        hard.type, hard.linkname = tarfile.LNKTYPE, f"{top}/model/config.json"
        device = tarfile.TarInfo(f"{top}/model/null")
        device.type = tarfile.CHRTYPE
        return [*members, (link, None), (hard, None), (device, None)]

    problems = _problems(_rewrite(built, tmp_path / "t.tar", add), key, load=False)
    assert "a link (to '/etc/passwd')" in problems[f"{top}/model/link.json"]
    assert "a link" in problems[f"{top}/model/hard.json"]
    assert "a device" in problems[f"{top}/model/null"]


def test_redigested_weights_fail_the_signature(built, key, data_dir, tmp_path):
    """Weights changed and the manifest's digests recomputed to match: the manifest is no longer the platform's."""
    members = _members(built)
    forged = _rewrite(built, tmp_path / "t.tar", _manifest_edit(lambda m: m, files={
        "model/model.safetensors": _weights(members, _scaled)}))  # fmt: skip
    problems = _problems(forged, key)
    assert problems == {"manifest.json": "the signature does not match its content (altered after signing)"}
    report = verify_archive(forged, key=key.public)
    assert report.notes == ["nothing else was checked: the manifest cannot be trusted"] and not report.checks


def test_remote_code_added_and_redigested_fails_the_signature(built, key, data_dir, tmp_path):
    members = _members(built)
    top = members[0][0].name
    config = json.loads(next(d for i, d in members if i.name == f"{top}/model/config.json") or b"")
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    files = {"model/config.json": json.dumps(config).encode(), "model/evil.py": b"import os\nos.system('id')\n"}
    forged = _rewrite(built, tmp_path / "t.tar", _manifest_edit(lambda m: m, files=files))
    assert "signature" in _problems(forged, key)["manifest.json"]


def test_unsigned_or_wrongly_signed_manifests_fail(built, key, data_dir, tmp_path):
    unsigned = _rewrite(built, tmp_path / "u.tar", _manifest_edit(lambda m: m.pop("signature")))
    assert _problems(unsigned, key) == {"manifest.json": "unsigned: it carries no platform signature"}
    other = SigningKey.generate()
    resigned = _rewrite(built, tmp_path / "o.tar", _manifest_edit(lambda m: m, sign=other))
    assert "signature: signed with another key" in _problems(resigned, key)["manifest.json"]
    assert "signed with another key" in _problems(built, other)["manifest.json"]  # a wrong public key
    report = verify_archive(built, key=None)
    assert not report.ok and [str(p) for p in report.problems] == [
        "manifest.json: the signature could not be checked: no platform public key is at hand (pass the published "
        "one with --public-key)"
    ]


def test_forged_and_signed_weights_are_caught_by_the_logits_check(built, key, data_dir, tmp_path):
    """Even a manifest signed again (an insider, a bug) cannot make other weights the engine's."""
    members = _members(built)
    forged = _rewrite(built, tmp_path / "t.tar", _manifest_edit(lambda m: m, sign=key, files={
        "model/model.safetensors": _weights(members, _scaled)}))  # fmt: skip
    problems = _problems(forged, key)
    assert list(problems) == ["model/"] and "logits differ from the engine's" in problems["model/"]


def test_the_manifest_tolerance_is_not_read(built, key, data_dir, tmp_path):
    import torch

    def loosen(manifest: dict[str, Any]) -> None:
        manifest["verification"]["tolerance"] = {"merged": 1e9, "adapter": 1e9}

    zeroed = _weights(_members(built), lambda tensors: {k: torch.zeros_like(v) for k, v in tensors.items()})
    forged = _rewrite(built, tmp_path / "t.tar", _manifest_edit(loosen, sign=key, files={
        "model/model.safetensors": zeroed}))  # fmt: skip
    problems = _problems(forged, key)
    assert "logits differ from the engine's" in problems["model/"] and "(allowed " in problems["model/"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: m["verification"].update(file="../../x"), "verification.file: not a file inside the archive"),
        (lambda m: m["verification"].update(file="/etc/passwd"), "verification.file: not a file inside the archive"),
        (lambda m: m["verification"].update(file="model\\..\\..\\x"), "verification.file: not a file inside"),
        (
            lambda m: m["verification"].update(file="model/absent.safetensors"),
            "verification.file: 'model/absent.safetensors' is not a file the manifest lists",
        ),
        (lambda m: m["files"].update({"../x": {"size": 1, "sha256": "0" * 64}}), "files.../x: the name is not a file"),
        (
            lambda m: m["base_model"]["files"].update({"../../../etc/passwd": {"sha256": "0" * 64}}),
            "base_model.files.../../../etc/passwd: the name is not a file inside the archive",
        ),
        (lambda m: m["base_model"].update(id="../../etc"), "base_model.id: must match"),
        (lambda m: m.pop("verification"), "verification: missing"),
        (lambda m: m["files"].update({"model/x.safetensors": 5}), "files.model/x.safetensors: must be an object"),
        (lambda m: m.update(stop_token_ids=5), "stop_token_ids: must be a list (got 5)"),
        (lambda m: m.update(files=[]), "files: must be an object (got a list)"),
        (lambda m: m.update(weights_dtype="float64"), "weights_dtype: must be"),
        (lambda m: m.update(contents={"merged": "../.."}), "contents.merged: must be 'model'"),
        (lambda m: m["files"]["README.md"].update(size="12"), "files.README.md.size: must be a whole number"),
    ],
)
def test_malformed_manifests_give_located_problems(built, key, data_dir, tmp_path, change, expected):
    for name, sign in (("signed.tar", key), ("unsigned.tar", None)):
        bad = _rewrite(built, tmp_path / name, _manifest_edit(change, sign=sign))
        problems = [str(p) for p in verify_archive(bad, key=key.public).problems]
        assert any(p.startswith(f"manifest.json: {expected}") for p in problems), problems
        assert any("signature" in p for p in problems) == (sign is None)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested more than 64 levels deep"),
        (b'{"a": "' + b"[" * 100_000 + b'"}', "not a manifest of format"),  # brackets in a string do not nest
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "not a manifest of format 'finetune-model-archive'"),
        (b'{"format": "finetune-model-archive", "format_version": 7}', "format version 7 is newer"),
        (b" " * (16 * 1024 * 1024 + 1), "16,777,217 bytes: more than it may hold (16,777,216)"),
    ],
)
def test_hostile_manifest_text_gives_a_problem(built, key, tmp_path, content, expected):
    top = _members(built)[0][0].name
    swap = lambda ms: [(i, content if i.name == f"{top}/manifest.json" else d) for i, d in ms]  # noqa: E731
    problems = _problems(_rewrite(built, tmp_path / "t.tar", swap), key)
    assert list(problems) == ["manifest.json"] and expected in problems["manifest.json"]


def test_the_manifest_must_come_first(built, key, tmp_path):
    moved = lambda ms: [ms[0], *ms[2:], ms[1]]  # noqa: E731
    problems = _problems(_rewrite(built, tmp_path / "t.tar", moved), key)
    assert list(problems) == ["manifest.json"] and "not the archive's first file" in problems["manifest.json"]


def test_a_member_larger_than_declared_is_never_written(built, key, data_dir, tmp_path):
    from finetune.archive.tarball import safe_extract

    top = _members(built)[0][0].name
    grow = lambda ms: [(i, d + b"x" * 100 if i.name == f"{top}/README.md" else d) for i, d in ms]  # noqa: E731
    grown = _rewrite(built, tmp_path / "t.tar", grow)
    problems = _problems(grown, key)
    assert list(problems) == ["README.md"] and "bytes, the manifest declares" in problems["README.md"]
    (tmp_path / "out").mkdir()
    extracted = safe_extract(grown, tmp_path / "out")
    assert "README.md" in extracted.oversized and not (tmp_path / "out" / top / "README.md").exists()


def test_a_decompression_bomb_stops_at_its_header(built, key, data_dir, tmp_path):
    """A small .tar.zst declaring a 10 GB member: refused from its header, nothing of it read or written."""
    top = _members(built)[0][0].name
    tar = _tar_bytes(_members(built), end=False)
    bomb = tarfile.TarInfo(f"{top}/model/model-00002-of-00002.safetensors")
    bomb.size = 10 * 10**9
    archive = _zstd(tar + bomb.tobuf(tarfile.PAX_FORMAT) + bytes(8 * 1024 * 1024), tmp_path / "bomb.tar.zst")
    assert archive.stat().st_size < 4 * 1024 * 1024
    started = time.monotonic()
    problems = _problems(archive, key)
    assert time.monotonic() - started < 30
    assert problems[bomb.name] == "10,000,000,000 bytes, more than the manifest declares: not read"

    # a listed file grown far past its declared size, in a few kilobytes of zstd
    grow = lambda ms: [(i, bytes(64 * 1024 * 1024) if i.name == f"{top}/README.md" else d) for i, d in ms]  # noqa: E731
    small = _zstd(_tar_bytes(grow(_members(built))), tmp_path / "grown.tar.zst")
    problems = _problems(small, key)
    assert problems[f"{top}/README.md"] == "67,108,864 bytes, more than the manifest declares: not read"


def test_a_corrupted_zstd_archive_is_a_problem_naming_the_file(built, key, tmp_path):
    data = _zstd(built.read_bytes(), tmp_path / "ok.tar.zst").read_bytes()
    middle = len(data) // 2
    for name, broken in (("head.tar.zst", data[:4] + b"\xff" * 16 + data[20:]), ("short.tar.zst", data[:middle])):
        (tmp_path / name).write_bytes(broken)
        problems = _problems(tmp_path / name, key)
        assert name in problems and "not a readable" in problems[name], problems
    (tmp_path / "middle.tar.zst").write_bytes(data[:middle] + bytes(64) + data[middle + 64 :])
    assert _problems(tmp_path / "middle.tar.zst", key)  # where depends on the bytes hit; never a traceback


def test_a_too_long_member_name_is_refused_by_name(built, key, data_dir, tmp_path):
    top = _members(built)[0][0].name
    name = f"{top}/model/{'a' * 300}.json"
    problems = _problems(_rewrite(built, tmp_path / "t.tar", lambda ms: [*ms, _file(name, b"{}")]), key, load=False)
    [(shown, problem)] = problems.items()
    assert shown.endswith(f"({len(name)} characters)") and "longer than" in problem


def test_not_an_archive(key, tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all" * 100)
    report = verify_archive(junk, key=key.public)
    assert not report.ok and report.problems[0].file == "junk.tar"
    assert not verify_archive(tmp_path / "absent.tar", key=key.public).ok
    (tmp_path / "empty.tar").write_bytes(bytes(10240))
    assert [str(p) for p in verify_archive(tmp_path / "empty.tar", key=key.public).problems] == [
        "empty.tar: an empty archive"
    ]


def test_member_names():
    assert member_problem("m/model/config.json") is None
    assert member_problem("m/model/model-00001-of-00002.safetensors") is None
    for bad in ("", "/a", "a/../b", "..", "a//b", "./a", "a\\b", "C:/x", "a/\x00b", "a/b\nc", "a/$(x)"):
        assert member_problem(bad), bad
    assert "longer than" in (member_problem("a/" + "b" * 256) or "")


def test_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200KB") == 200_000 and parse_size("512MiB") == 2**29
    assert parse_size("1000") == 1000 and parse_size(" 1.5 gb ") == 1_500_000_000
    for bad in ("abc", "", "0", "-1GB", "5XB", "GB"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)
