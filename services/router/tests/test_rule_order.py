"""Which rules decide a batch (shared/rule_order.py), without a broker."""

from __future__ import annotations

from services.router.tests.helpers import TARGETS
from shared.config.model import CaduceusConfig
from shared.rule_order import evaluate_in_order


def test_a_series_a_study_rule_takes_gets_no_series_fallback() -> None:
    # A fallback applies when no other rule matched (mercure evaluates series and study rules
    # together on each series): an MR series the study rule collects is not also sent to the archive.
    config = CaduceusConfig.parse({"targets": TARGETS, "rules": {
        "mr-study": {"filter": "@Modality@ == 'MR'", "trigger": "study", "targets": ["pacs"]},
        "z-fallback": {"filter": "True", "fallback": True, "targets": ["archive"]}}})
    mr = evaluate_in_order(config, "series", {"Modality": "MR"})
    assert mr.matched == [] and mr.left_to_study_rules(config, "series")
    ct = evaluate_in_order(config, "series", {"Modality": "CT"})
    assert [name for name, _ in ct.matched] == ["z-fallback"]


def test_a_series_the_study_rule_will_not_take_keeps_its_fallback() -> None:
    # The study decision sees the study's first instance: a PT series of a study that began with CT
    # is not taken by `@Modality@ == 'PT'` there, so the series fallback still sends it.
    config = CaduceusConfig.parse({"targets": TARGETS, "rules": {
        "pt-study": {"filter": "@Modality@ == 'PT'", "trigger": "study", "targets": ["pacs"]},
        "z-fallback": {"filter": "True", "fallback": True, "targets": ["archive"]}}})
    pt_of_ct_study = evaluate_in_order(config, "series", {"Modality": "PT"}, study_tags={"Modality": "CT"})
    assert [name for name, _ in pt_of_ct_study.matched] == ["z-fallback"]
    pt_of_pt_study = evaluate_in_order(config, "series", {"Modality": "PT"}, study_tags={"Modality": "PT"})
    assert pt_of_pt_study.matched == [] and pt_of_pt_study.left_to_study_rules(config, "series")
