"""Verification catches tampering, naming the file: a flipped byte, a removed or added file, unsafe members."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from finetune.archive import verify_archive
from finetune.archive.layout import member_problem

Member = tuple[tarfile.TarInfo, bytes | None]


@pytest.fixture(scope="module")
def built(jobs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "lora.tar"
    jobs.build(jobs.lora, out)
    return out


def _members(archive: Path) -> list[Member]:
    members: list[Member] = []
    with tarfile.open(archive) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read() if info.isreg() else None  # type: ignore[union-attr]
            members.append((info, data))
    return members


def _rewrite(archive: Path, dest: Path, change: Callable[[list[Member]], list[Member]]) -> Path:
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in change(_members(archive)):
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return dest


def _file(name: str, data: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _problems(archive: Path) -> dict[str, str]:
    report = verify_archive(archive)
    assert not report.ok
    return {p.file: p.message for p in report.problems}


def test_untouched_archive_verifies(built, data_dir):
    assert verify_archive(built).ok


def test_one_flipped_byte_is_found(built, data_dir, tmp_path):
    def flip(members: list[Member]) -> list[Member]:
        out = []
        for info, data in members:
            if info.name.endswith("model/model.safetensors") and data is not None:
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]
            out.append((info, data))
        return out

    problems = _problems(_rewrite(built, tmp_path / "t.tar", flip))
    assert list(problems) == ["model/model.safetensors"] and "sha256 differs" in problems["model/model.safetensors"]
    assert "not loaded, its files failed the integrity check" in " ".join(verify_archive(tmp_path / "t.tar").notes)


def test_removed_file_is_found(built, data_dir, tmp_path):
    keep = lambda ms: [m for m in ms if not m[0].name.endswith("tokenizer.json")]  # noqa: E731
    removed = _rewrite(built, tmp_path / "t.tar", keep)
    problems = _problems(removed)
    assert set(problems) == {"model/tokenizer.json", "adapter/tokenizer.json"}
    assert all("missing" in m for m in problems.values())


def test_added_file_is_found(built, data_dir, tmp_path):
    top = _members(built)[0][0].name
    added = _rewrite(built, tmp_path / "t.tar", lambda ms: [*ms, _file(f"{top}/model/extra.py", b"print(1)\n")])
    problems = _problems(added)
    assert list(problems) == ["model/extra.py"] and "not listed in the manifest" in problems["model/extra.py"]


@pytest.mark.parametrize("name", ["../x", "{top}/../../x", "/tmp/finetune-abs-x", "{top}/a\\b"])
def test_unsafe_member_names_are_refused_and_never_written(built, data_dir, tmp_path, name):
    top = _members(built)[0][0].name
    name = name.format(top=top)
    (tmp_path / "work").mkdir()
    evil = _rewrite(built, tmp_path / "work" / "t.tar", lambda ms: [*ms, _file(name, b"escaped")])
    problems = _problems(evil)
    assert list(problems) == [name] and problems[name].startswith("refused:")
    assert not (tmp_path / "x").exists() and not (tmp_path / "work" / "x").exists()
    assert not Path("/tmp/finetune-abs-x").exists()


def test_links_and_devices_are_refused(built, data_dir, tmp_path):
    top = _members(built)[0][0].name

    def add(members: list[Member]) -> list[Member]:
        link = tarfile.TarInfo(f"{top}/model/link.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        hard = tarfile.TarInfo(f"{top}/model/hard.json")
        hard.type, hard.linkname = tarfile.LNKTYPE, f"{top}/model/config.json"
        device = tarfile.TarInfo(f"{top}/model/null")
        device.type = tarfile.CHRTYPE
        return [*members, (link, None), (hard, None), (device, None)]

    problems = _problems(_rewrite(built, tmp_path / "t.tar", add))
    assert "a link (to '/etc/passwd')" in problems[f"{top}/model/link.json"]
    assert "a link" in problems[f"{top}/model/hard.json"]
    assert "a device" in problems[f"{top}/model/null"]


def test_forged_manifest_is_caught_by_the_logits_check(built, data_dir, tmp_path):
    """Weights changed and the manifest's digests recomputed to match: the model is not the engine's."""
    import hashlib

    from safetensors.torch import load, save

    def forge(members: list[Member]) -> list[Member]:
        by_name = {info.name: (info, data) for info, data in members}
        top = members[0][0].name
        weights_name = f"{top}/model/model.safetensors"
        tensors = load(by_name[weights_name][1])  # type: ignore[arg-type]
        key = next(k for k in tensors if "mlp.down_proj" in k)
        tensors[key] = tensors[key] * 1.5
        new = save(tensors, metadata={"format": "pt"})
        manifest_name = f"{top}/manifest.json"
        manifest = json.loads(by_name[manifest_name][1])  # type: ignore[arg-type]
        manifest["files"]["model/model.safetensors"] = {"size": len(new), "sha256": hashlib.sha256(new).hexdigest()}
        replaced = {weights_name: new, manifest_name: json.dumps(manifest).encode()}
        return [(info, replaced.get(info.name, data)) for info, data in members]

    problems = _problems(_rewrite(built, tmp_path / "t.tar", forge))
    assert list(problems) == ["model/"] and "logits differ from the engine's" in problems["model/"]


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all" * 100)
    report = verify_archive(junk)
    assert not report.ok and report.problems[0].file == "junk.tar"
    assert not verify_archive(tmp_path / "absent.tar").ok


def test_member_names():
    assert member_problem("m/model/config.json") is None
    assert member_problem("m/model/model-00001-of-00002.safetensors") is None
    for bad in ("", "/a", "a/../b", "..", "a//b", "./a", "a\\b", "C:/x", "a/\x00b", "a/b\nc", "a/$(x)"):
        assert member_problem(bad), bad
