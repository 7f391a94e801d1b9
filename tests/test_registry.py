"""The registry loader: shape, consistency with the origin policy, and the lock file."""

import json
import textwrap

import pytest

from finetune.errors import RegistryError
from finetune.origin import Decision
from finetune.registry import Registry, Status

HEADER = """\
version: 1
chat_templates:
  plain: "{% for m in messages %}{{ m.content }}{% endfor %}"
models:
"""

GOOD = """\
  - id: demo-1b
    name: Demo 1B
    status: approved
    developer: {entity: Demo Labs, country: TW}
    source: {repo: demo/Demo-1B}
    architecture: {model_type: llama, hidden_size: 8}
    chat: {template: plain, eos: "</s>", eot: "</s>"}
    components:
      - {part: base_weights, entity: Demo Labs, country: TW}
  - id: bad-family
    kind: family
    name: Bad family
    status: denied
    reason: developed in the PRC
    developer: {entity: Bad Lab, country: CN}
    repos: ["BadLab/*"]
"""


def write(tmp_path, body: str):
    path = tmp_path / "registry.yaml"
    path.write_text(HEADER + textwrap.dedent(body) if not body.startswith("  ") else HEADER + body)
    return path


def load_issues(path, lock=None) -> list[str]:
    with pytest.raises(RegistryError) as exc:
        Registry.load(path, lock)
    return [str(i) for i in exc.value.issues]


def test_a_good_registry_loads(tmp_path):
    reg = Registry.load(write(tmp_path, GOOD))
    assert len(reg) == 2
    assert [e.id for e in reg.by_status(Status.APPROVED)] == ["demo-1b"]
    assert reg.verdict(reg.get("demo-1b")).decision is Decision.ALLOW
    assert reg.verdict(reg.get("bad-family")).decision is Decision.DENY
    assert [e.id for e in reg.find_repo("badlab/Some-Model-7B")] == ["bad-family"]
    assert reg.find_repo("GoodLab/x") == []


def test_approving_a_model_with_a_prc_component_is_a_registry_error(tmp_path):
    body = GOOD.replace(
        "      - {part: base_weights, entity: Demo Labs, country: TW}",
        "      - {part: base_weights, entity: Demo Labs, country: TW}\n"
        "      - {part: vision_encoder, entity: Shanghai AI Laboratory, country: CN}",
    )
    issues = load_issues(write(tmp_path, body))
    assert issues == [
        "models.demo-1b.status: marked approved but the origin policy says review: "
        "vision_encoder from Shanghai AI Laboratory (CN): PRC origin; needs case-by-case review"
    ]


def test_approving_a_post_train_of_a_denied_family_is_a_registry_error(tmp_path):
    body = GOOD.replace(
        "    source: {repo: demo/Demo-1B}\n", "    source: {repo: demo/Demo-1B}\n    lineage: [BadLab/Base-7B]\n"
    )
    assert "derived from 'BadLab/Base-7B'" in load_issues(write(tmp_path, body))[0]


def test_shape_errors_are_located(tmp_path):
    body = GOOD.replace("    reason: developed in the PRC\n", "") + "  - id: demo-1b\n    nme: x\n"
    issues = load_issues(write(tmp_path, body))
    assert any(":14: models.1: a denied entry needs a reason" in i for i in issues)
    assert any(":21: models.2.nme: unknown setting 'nme'" in i for i in issues)


def test_duplicate_ids_and_unknown_templates(tmp_path):
    body = GOOD + GOOD.split("  - id: bad-family")[0].replace("template: plain", "template: nope")
    issues = load_issues(write(tmp_path, body))
    assert any("models.2.id: duplicate id 'demo-1b'" in i for i in issues)
    assert any("models.demo-1b.chat.template: no chat template named 'nope'" in i for i in issues)


def test_lock_fills_revision_and_digests(tmp_path):
    lock = tmp_path / "lock.json"
    digest = {"sha256": "ab" * 32, "size": 3}
    lock.write_text(
        json.dumps(
            {"version": 1, "models": {"demo-1b": {"revision": "c" * 40, "files": {"model.safetensors": digest}}}}
        )
    )
    reg = Registry.load(write(tmp_path, GOOD), lock)
    entry = reg.get("demo-1b")
    assert entry.source.revision == "c" * 40
    assert entry.files["model.safetensors"].sha256 == "ab" * 32


def test_lock_that_contradicts_a_pinned_revision_is_an_error(tmp_path):
    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"version": 1, "models": {"demo-1b": {"revision": "c" * 40, "files": {}}}}))
    body = GOOD.replace("source: {repo: demo/Demo-1B}", f"source: {{repo: demo/Demo-1B, revision: {'d' * 40}}}")
    assert "lock pins revision" in load_issues(write(tmp_path, body), lock)[0]


def test_denied_digests_come_from_weight_files_only(tmp_path):
    lock = tmp_path / "lock.json"
    files = {"model.safetensors": {"sha256": "11" * 32, "size": 1}, "tokenizer.json": {"sha256": "22" * 32, "size": 1}}
    body = GOOD.replace(
        "  - id: bad-family",
        "  - id: bad-7b\n    name: Bad 7B\n    status: denied\n    reason: PRC\n"
        "    developer: {entity: Bad Lab, country: CN}\n  - id: bad-family",
    )
    lock.write_text(json.dumps({"version": 1, "models": {"bad-7b": {"revision": "e" * 40, "files": files}}}))
    reg = Registry.load(write(tmp_path, body), lock)
    assert reg.denied_digests == {"11" * 32: "bad-7b"}


def test_approving_a_disguised_denied_developer_is_a_registry_error(tmp_path):
    body = GOOD.replace("developer: {entity: Demo Labs, country: TW}", "developer: {entity: 深度求索, country: TW}")
    assert load_issues(write(tmp_path, body)) == [
        "models.demo-1b.status: marked approved but the origin policy says deny: "
        "developed by 深度求索 (DeepSeek), a developer entity of PRC origin"
    ]


def test_the_shipped_registry_and_the_denied_developers_agree():
    """Every PRC developer the registry records is known to the policy by name (so a tenant who
    declares it under another country is still denied), and no approved developer is."""
    from pathlib import Path

    from finetune.origin import entity_is_denied

    reg = Registry.load(Path(__file__).resolve().parents[1] / "model_registry.yaml")
    prc = {e.developer.entity for e in reg if e.developer.country == "CN"}
    assert prc and {name for name in prc if not entity_is_denied(name)} == set()
    approved = {c.entity for e in reg.by_status(Status.APPROVED) for c in e.components}
    approved |= {e.developer.entity for e in reg.by_status(Status.APPROVED)}
    assert {name for name in approved if entity_is_denied(name)} == set()
