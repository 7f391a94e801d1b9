"""The origin policy, rule by rule (PLATFORM.md P8)."""

from finetune.origin import Component, Decision, OriginFacts, entity_is_denied, judge, normalise_entity


def test_us_developer_with_us_components_is_allowed():
    facts = OriginFacts("Meta Platforms", "US", components=(Component("base_weights", "Meta Platforms", "US"),))
    verdict = judge(facts)
    assert verdict.decision is Decision.ALLOW
    assert verdict.reasons == ["developed by Meta Platforms (US); no component of denied origin"]


def test_prc_country_is_denied():
    verdict = judge(OriginFacts("01.AI", "CN"))
    assert verdict.decision is Decision.DENY
    assert "developed by 01.AI (CN): PRC origin" in verdict.reasons


def test_denied_entity_is_denied_whatever_country_is_declared():
    verdict = judge(OriginFacts("Alibaba Cloud Co., Ltd.", "US"))
    assert verdict.decision is Decision.DENY
    assert verdict.reasons == ["developed by Alibaba Cloud Co., Ltd., a developer entity of PRC origin"]


def test_base_weights_of_prc_origin_deny_even_when_published_elsewhere():
    facts = OriginFacts("Some Lab", "SG", components=(Component("base_weights", "DeepSeek", "CN"),))
    assert judge(facts).decision is Decision.DENY


def test_non_decisive_component_of_prc_origin_goes_to_review():
    facts = OriginFacts(
        "MediaTek Research",
        "TW",
        components=(
            Component("base_weights", "MediaTek Research", "TW"),
            Component("vision_encoder", "Shanghai AI Laboratory", "CN"),
        ),
    )
    verdict = judge(facts)
    assert verdict.decision is Decision.REVIEW
    assert verdict.reasons == ["vision_encoder from Shanghai AI Laboratory (CN): PRC origin; needs case-by-case review"]


def test_post_train_of_a_denied_model_goes_to_review():
    facts = OriginFacts(
        "Perplexity AI", "US", lineage=("deepseek-ai/DeepSeek-R1",), denied_lineage=("deepseek-ai/DeepSeek-R1",)
    )
    verdict = judge(facts)
    assert verdict.decision is Decision.REVIEW
    assert "derived from 'deepseek-ai/DeepSeek-R1'" in verdict.reasons[0]


def test_renamed_denied_checkpoint_is_denied_by_digest():
    verdict = judge(OriginFacts("Totally New Labs", "TW", digest_matches_denied=("yi-1.5-34b",), declared_only=True))
    assert verdict.decision is Decision.DENY
    assert "weight files are identical to denied model 'yi-1.5-34b'" in verdict.reasons


def test_architecture_alone_never_denies():
    verdict = judge(OriginFacts("Illuin Technology", "FR", architecture_notes=("architecture 'qwen2' ...",)))
    assert verdict.decision is Decision.REVIEW


def test_declared_facts_need_review():
    assert judge(OriginFacts("Acme", "TW", declared_only=True)).decision is Decision.REVIEW


def test_strictest_rule_wins_and_all_reasons_are_kept():
    verdict = judge(OriginFacts("DeepSeek", "CN", architecture_notes=("note",), declared_only=True))
    assert verdict.decision is Decision.DENY
    assert len(verdict.reasons) == 3


def test_entity_normalisation():
    assert normalise_entity("01.AI Co., Ltd.") == "01 ai"
    assert entity_is_denied("Tencent Holdings")
    assert entity_is_denied("BAAI")
    assert not entity_is_denied("Qwenfield Analytics")  # a prefix inside a word does not count
    assert not entity_is_denied("MediaTek Research")


def test_normalisation_of_disguises():
    assert normalise_entity("The Qwen Team") == "qwen team"
    assert normalise_entity("ＤｅｅｐＳｅｅｋ") == "deep seek"  # fullwidth, then camel case split
    assert normalise_entity("D\u0435ep\u200bseek") == "deepseek"  # a Cyrillic е and a zero-width space
    assert normalise_entity("Zhipu AI Co., Ltd.") == normalise_entity("zhipu-ai")
    assert entity_is_denied("The Qwen Team") and entity_is_denied("Deep Seek")
    assert not entity_is_denied("Deep Seeker Inc")
