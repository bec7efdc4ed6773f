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
