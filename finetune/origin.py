"""Origin policy: may a model be trained on this platform?

The platform refuses models of PRC origin or with security concerns (PLATFORM.md, P8). The test is
the model's actual developer entity and the origin of each of its components, never its
``model_type`` or its name: Yi and DeepSeek-R1-Distill-Llama declare ``llama`` and are denied,
TAIDE is a Llama architecture and is allowed, Breeze2 embeds a vision encoder of PRC origin and
goes to review.

:func:`judge` is a small pure function over :class:`OriginFacts`, so every rule is easy to test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

#: Countries whose models are not allowed (ISO 3166-1 alpha-2). The brief names the PRC.
DENIED_COUNTRIES: frozenset[str] = frozenset({"CN"})

#: Developer entities of PRC origin, normalised with :func:`normalise_entity`. A model declared
#: as coming from one of these is denied whatever country is declared with it.
DENIED_ENTITIES: frozenset[str] = frozenset(
    {
        "alibaba", "alibaba cloud", "qwen", "qwen team", "deepseek", "deepseek ai", "hangzhou deepseek",
        "zhipu", "zhipu ai", "z ai", "thudm", "baichuan", "baichuan inc", "shanghai ai lab",
        "shanghai ai laboratory", "internlm", "opengvlab", "01 ai", "01ai", "minimax", "moonshot",
        "moonshot ai", "tencent", "baidu", "bytedance", "bytedance seed", "meituan", "rednote",
        "xiaohongshu", "openbmb", "modelbest", "orionstar", "baai",
        "beijing academy of artificial intelligence",
    }
)  # fmt: skip

#: Components whose origin decides alone: a denied origin here denies the model.
DECISIVE_PARTS: frozenset[str] = frozenset({"base_weights"})


class Decision(StrEnum):
    ALLOW = "allow"
    REVIEW = "review"
    DENY = "deny"


_RANK = {Decision.ALLOW: 0, Decision.REVIEW: 1, Decision.DENY: 2}


def normalise_entity(name: str) -> str:
    """Lower-case, drop punctuation and legal suffixes: ``"01.AI Co., Ltd."`` -> ``"01 ai"``."""
    text = re.sub(r"[^0-9a-z]+", " ", name.lower())
    text = re.sub(r"\b(co|ltd|inc|llc|corp|corporation|company|limited|technology|technologies)\b", " ", text)
    return " ".join(text.split())


def entity_is_denied(name: str) -> bool:
    norm = normalise_entity(name)
    return any(norm == d or norm.startswith(d + " ") for d in DENIED_ENTITIES)


@dataclass(frozen=True)
class Component:
    """Where one part of a model comes from."""

    part: str  # base_weights | tokenizer | vision_encoder | audio_encoder | ...
    entity: str
    country: str
    source: str | None = None


@dataclass(frozen=True)
class OriginFacts:
    """Everything known about a model's origin, whether from the registry or declared by a tenant.

    Attributes:
        developer: Entity that published the weights being trained.
        country: ISO country code of that entity.
        components: Origin per component (base weights, tokenizer, vision encoder...).
        lineage: Repositories or families the weights were derived from (fine-tunes, distills).
        denied_lineage: The subset of ``lineage`` known to be of denied origin.
        digest_matches_denied: Registry ids of denied models whose weight digests these files match.
        architecture_notes: Soft signals (a PRC family's ``model_type``, a known denied
            architecture signature). They send a model to review, never deny it alone.
        declared_only: True when the facts are a tenant's declaration not yet verified by review.
    """

    developer: str
    country: str
    components: tuple[Component, ...] = ()
    lineage: tuple[str, ...] = ()
    denied_lineage: tuple[str, ...] = ()
    digest_matches_denied: tuple[str, ...] = ()
    architecture_notes: tuple[str, ...] = ()
    declared_only: bool = False


@dataclass
class Verdict:
    decision: Decision
    reasons: list[str] = field(default_factory=list)

    def raise_to(self, decision: Decision, reason: str) -> None:
        if _RANK[decision] > _RANK[self.decision]:
            self.decision = decision
        self.reasons.append(reason)

    def as_dict(self) -> dict[str, object]:
        return {"decision": self.decision.value, "reasons": list(self.reasons)}


def _denied_origin(entity: str, country: str) -> str | None:
    """``"DeepSeek (CN)"`` when the origin is denied, else None."""
    if country.upper() in DENIED_COUNTRIES:
        return f"{entity} ({country.upper()}): PRC origin"
    if entity_is_denied(entity):
        return f"{entity}, a developer entity of PRC origin"
    return None


def judge(facts: OriginFacts) -> Verdict:
    """Decide allow, review or deny from origin facts, with every reason that applied.

    Rules, strictest wins:
      * deny: the developer entity is of PRC origin, by country or by name of entity;
      * deny: the base weights come from such an entity;
      * deny: the weight files are byte-identical to a denied model's (a renamed checkpoint);
      * review: another component (tokenizer, vision encoder...) is of PRC origin;
      * review: the weights derive from a denied model (a post-train of a PRC model);
      * review: architecture signals that resemble a denied family (never decisive alone);
      * review: the facts are only declared and not yet verified;
      * allow otherwise.
    """
    verdict = Verdict(Decision.ALLOW)
    denied_dev = _denied_origin(facts.developer, facts.country)
    if denied_dev:
        verdict.raise_to(Decision.DENY, f"developed by {denied_dev}")
    for comp in facts.components:
        denied = _denied_origin(comp.entity, comp.country)
        if not denied:
            continue
        if comp.part in DECISIVE_PARTS:
            verdict.raise_to(Decision.DENY, f"{comp.part} from {denied}")
        else:
            verdict.raise_to(Decision.REVIEW, f"{comp.part} from {denied}; needs case-by-case review")
    for model_id in facts.digest_matches_denied:
        verdict.raise_to(Decision.DENY, f"weight files are identical to denied model '{model_id}'")
    for source in facts.denied_lineage:
        verdict.raise_to(Decision.REVIEW, f"derived from '{source}', a model of denied origin; needs review")
    for note in facts.architecture_notes:
        verdict.raise_to(Decision.REVIEW, note)
    if facts.declared_only:
        verdict.raise_to(Decision.REVIEW, "origin is declared by the uploader and not yet verified")
    if verdict.decision is Decision.ALLOW:
        verdict.reasons.append(
            f"developed by {facts.developer} ({facts.country.upper()}); no component of denied origin"
        )
    return verdict
