"""Rules can use who sent an instance, as mercure's SenderAET / ReceiverAET / SenderAddress."""

from __future__ import annotations

from datetime import UTC, datetime

from services.receiver.receipt import Receipt, received_event
from shared.config.model import CaduceusConfig
from shared.dicomtags import ExtractedTags
from shared.rules import compile_rule


def test_the_association_is_in_the_tags_rules_see() -> None:
    receipt = Receipt("e1", datetime.now(UTC), "a1", "CT_SCANNER1", "CADUCEUS", "10.0.0.7", 40000, "1.2.840.10008.1.2")
    tags = ExtractedTags("1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2",
                         {"Modality": "CT"})
    event = received_event(receipt, tags, "key", 10, "0" * 64, "new")
    rule = compile_rule("@SenderAET@ == 'CT_SCANNER1' and tags.ReceiverAET == 'CADUCEUS' "
                        "and @SenderAddress@.startswith('10.')")
    assert rule.evaluate(event.payload["tags"]).matched
    assert rule.warnings == []
    config = CaduceusConfig.parse({"targets": {"pacs": {"host": "h", "port": 104, "called_aet": "PACS"}},
                                   "rules": {"ct1": {"filter": "@SenderAET@ == 'CT_SCANNER1'", "targets": "pacs"}}})
    assert config.warnings() == []
