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
import unicodedata
from dataclasses import dataclass, field
from enum import StrEnum

#: Countries whose models are not allowed (ISO 3166-1 alpha-2). The brief names the PRC.
DENIED_COUNTRIES: frozenset[str] = frozenset({"CN"})

#: Developer entities of PRC origin, each with the other names it goes by: Chinese names in
#: simplified and traditional script, pinyin, former names and brands that name the developer. A
#: model declared as coming from one of these is denied whatever country is declared with it.
#: Chinese names are matched anywhere in a name (Chinese has no spaces between words), so only
#: names specific to the developer belong here: 阿里巴巴, never 阿里 (阿里山 is a place in Taiwan);
#: a name that is also a common word goes in :data:`WHOLE_WORD_ONLY` too.
DENIED_DEVELOPERS: dict[str, tuple[str, ...]] = {
    "Alibaba Cloud": ("Alibaba", "Qwen", "Qwen Team", "Tongyi", "Tongyi Qianwen", "Tongyi Lab", "DAMO Academy",
                      "阿里巴巴", "阿里云", "阿里雲", "通义千问", "通義千問", "千问", "通义实验室", "通義實驗室",
                      "达摩院", "達摩院"),
    "Ant Group": ("inclusionAI", "蚂蚁集团", "螞蟻集團"),
    "DeepSeek": ("DeepSeek AI", "Hangzhou DeepSeek", "Shendu Qiusuo", "深度求索"),
    "Zhipu AI": ("Zhipu", "Z.ai", "THUDM", "Knowledge Atlas", "智谱", "智譜"),
    "Baichuan Inc.": ("Baichuan", "百川", "百川智能"),
    "Shanghai AI Laboratory": ("Shanghai AI Lab", "InternLM", "OpenGVLab", "上海人工智能实验室", "上海人工智能實驗室",
                               "书生浦语", "書生浦語"),
    "01.AI": ("01AI", "Lingyi Wanwu", "零一万物", "零一萬物"),
    "MiniMax": ("稀宇",),
    "Moonshot AI": ("Moonshot", "Yuezhi Anmian", "月之暗面"),
    "Tencent": ("Tencent Hunyuan", "Hunyuan", "Tengxun", "腾讯", "騰訊"),
    "Baidu": ("ERNIE Bot", "百度", "文心一言"),
    "ByteDance": ("ByteDance Seed", "Doubao", "Zijie Tiaodong", "字节跳动", "字節跳動", "豆包大模型"),
    "Meituan": ("美团", "美團"),
    "rednote": ("Xiaohongshu", "小红书", "小紅書"),
    "OpenBMB": ("ModelBest", "Mianbi", "面壁", "面壁智能"),
    "OrionStar": ("猎户星空", "獵戶星空"),
    "Beijing Academy of Artificial Intelligence": ("BAAI", "北京智源"),
    "SenseTime": ("商汤", "商湯"),
    "iFlytek": ("科大讯飞", "科大訊飛"),
    "StepFun": ("阶跃星辰", "階躍星辰"),
    "Kuaishou": ("Kwai", "快手", "快手科技"),
    "Huawei": ("华为", "華為"),
    "Xiaomi": ("小米", "小米科技", "小米集团", "小米集團"),
    "Kunlun Tech": ("Skywork", "昆仑万维", "崑崙萬維"),
}  # fmt: skip

#: Chinese names that are also common words (百川 "a hundred rivers", 面壁 "facing the wall", 快手
#: "a quick hand", 小米 "millet"): they designate the developer only as a whole word of a name.
WHOLE_WORD_ONLY: frozenset[str] = frozenset({"百川", "面壁", "快手", "小米"})

#: Words that say what kind of entity a name is, not which one: dropped before comparing.
LEGAL_WORDS: frozenset[str] = frozenset(
    {"co", "ltd", "inc", "llc", "corp", "corporation", "company", "limited", "technology", "technologies",
     "gmbh", "plc", "pte", "kk"}
)  # fmt: skip

#: Letters of other scripts that look like Latin ones (after case-folding), mapped to them. Wider
#: forms (fullwidth, mathematical letters) are already Latin after NFKC.
CONFUSABLES: dict[str, str] = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "н": "h", "і": "i", "ї": "i", "ј": "j", "к": "k",
    "ӏ": "l", "м": "m", "о": "o", "р": "p", "ԛ": "q", "ѕ": "s", "т": "t", "у": "y", "ү": "y", "х": "x",
    "ԁ": "d", "ԝ": "w", "с": "c", "п": "n",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "m", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ζ": "z", "ϲ": "c", "ϳ": "j",
    # Latin letters that look like other Latin letters
    "ı": "i", "ɡ": "g", "ɑ": "a", "ɩ": "i", "ʟ": "l", "ᴅ": "d", "ꞵ": "b",
}  # fmt: skip
_CONFUSABLE_TABLE = str.maketrans(CONFUSABLES)
#: Only for comparing: characters that look alike even within Latin (``AIibaba``, ``0penBMB``).
_LOOKALIKE_TABLE = str.maketrans({"0": "o", "1": "l", "i": "l"})
_CJK = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_WORD_BREAK = re.compile(r"[\W_]+")


def _hidden(char: str) -> bool:
    return unicodedata.combining(char) != 0 or unicodedata.category(char) == "Cf"


def _words(name: str) -> list[str]:
    """The words of a developer name, normalised for comparison (see :func:`normalise_entity`)."""
    text = unicodedata.normalize("NFKC", name)
    # Accents and invisible characters (zero-width spaces, joiners) go: they hide a name, not change it.
    text = "".join(c for c in unicodedata.normalize("NFD", text) if not _hidden(c))
    text = "".join(f" {c}" if i and c.isupper() and text[i - 1].islower() else c for i, c in enumerate(text))
    words = [w for w in _WORD_BREAK.split(text.casefold().translate(_CONFUSABLE_TABLE)) if w]
    if words and words[0] == "the":
        words = words[1:]
    return [w for w in words if w not in LEGAL_WORDS]


def normalise_entity(name: str) -> str:
    """The comparable form of a developer name: ``"01.AI Co., Ltd."`` -> ``"01 ai"``.

    NFKC (fullwidth and styled letters become plain ones), accents and invisible characters
    dropped, case-folded, letters of other scripts that look Latin mapped to Latin (a Cyrillic
    ``е`` in ``Dеepseek``), camel case split (``DeepSeek`` -> ``deep seek``), punctuation and
    spacing reduced to single spaces, a leading "the" and legal words (``Co., Ltd.``) dropped.
    """
    return " ".join(_words(name))


def _key(words: list[str]) -> str:
    return "".join(words).translate(_LOOKALIKE_TABLE)


def _denied_keys() -> tuple[dict[str, str], dict[str, str]]:
    latin: dict[str, str] = {}
    chinese: dict[str, str] = {}
    for canonical, aliases in DENIED_DEVELOPERS.items():
        for name in (canonical, *aliases):
            key = _key(_words(name))
            (chinese if _CJK.search(key) and name not in WHOLE_WORD_ONLY else latin)[key] = canonical
    return latin, chinese


_DENIED_LATIN, _DENIED_CHINESE = _denied_keys()
_LONGEST_KEY = max(len(k) for k in _DENIED_LATIN)

#: Every denied name in its normal form (see :func:`normalise_entity`).
DENIED_ENTITIES: frozenset[str] = frozenset(
    normalise_entity(n) for canonical, aliases in DENIED_DEVELOPERS.items() for n in (canonical, *aliases)
)


def denied_entity(name: str) -> str | None:
    """The denied developer ``name`` designates, or None.

    A name designates a denied developer when some run of its words, joined without spaces, is
    one of that developer's names (``Deep Seek``, ``The Qwen Team``, ``Tencent Holdings``), or when
    it contains one of its Chinese names anywhere (``杭州深度求索人工智能``). A denied name inside a
    longer word does not count (``Qwenfield``, ``百川匯流``), except for those Chinese names.
    """
    words = _words(name)
    joined = _key(words)
    for key, canonical in _DENIED_CHINESE.items():
        if key in joined:
            return canonical
    for start in range(len(words)):
        run = ""
        for word in words[start:]:
            run += word.translate(_LOOKALIKE_TABLE)
            if len(run) > _LONGEST_KEY:
                break
            if run in _DENIED_LATIN:
                return _DENIED_LATIN[run]
    return None


def entity_is_denied(name: str) -> bool:
    return denied_entity(name) is not None


#: Components whose origin decides alone: a denied origin here denies the model.
DECISIVE_PARTS: frozenset[str] = frozenset({"base_weights"})


class Decision(StrEnum):
    ALLOW = "allow"
    REVIEW = "review"
    DENY = "deny"


_RANK = {Decision.ALLOW: 0, Decision.REVIEW: 1, Decision.DENY: 2}


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
    canonical = denied_entity(entity)
    if canonical is not None:
        alias = "" if normalise_entity(entity) == normalise_entity(canonical) else f" ({canonical})"
        return f"{entity}{alias}, a developer entity of PRC origin"
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
