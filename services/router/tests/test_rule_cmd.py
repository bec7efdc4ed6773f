"""`caduceus rule test`: exit codes, printed tags, and the three tag sources (JSON, DICOM, series)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from cli.main import main
from services.router.tests.helpers import send_series
from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from shared.config.model import CaduceusConfig
from shared.config.state import plan_changes


@pytest.fixture
def tags_file(tmp_path: Path) -> Path:
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"Modality": "CT", "SliceThickness": "1.0", "SeriesNumber": 3}))
    return path


@pytest.mark.parametrize(("expr", "code", "expected"), [
    ("float(tags.SliceThickness) < 2.0 and @Modality@ == 'CT'", 0, "MATCH"),
    ("@Modality@ == 'MR'", 1, "NO MATCH"),
    ("@SeriesNumber@ == '3' and @BodyPartExamined@ == ''", 0, "missing tags: BodyPartExamined"),
    ("float(@PatientWeight@) > 70", 2, "ERROR: ValueError"),
])
def test_rule_test_with_tags_file(tags_file: Path, expr: str, code: int, expected: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rule", "test", "--filter", expr, "--tags", str(tags_file)]) == code
    out = capsys.readouterr().out
    assert expected in out
    assert "Modality" in out or "PatientWeight" in out or "SeriesNumber" in out


def test_rule_test_tags_file_lists_are_multi_values(tmp_path: Path) -> None:
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "PatientName": None}))
    expr = "@ImageType@ == 'ORIGINAL\\\\PRIMARY\\\\AXIAL' and @PatientName@ == ''"
    assert main(["rule", "test", "--filter", expr, "--tags", str(path)]) == 0


def test_rule_test_syntax_error_points_at_the_problem(tags_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rule", "test", "--filter", "@Modality@ == 'CT' and ().__class__", "--tags", str(tags_file)]) == 2
    err = capsys.readouterr().err
    assert "column 24" in err and "__class__" in err and "^" in err


def test_rule_test_json_output(tags_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rule", "test", "--filter", "@Modality@ == 'CT'", "--tags", str(tags_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["matched"] is True and result["used_tags"] == {"Modality": "CT"}


def test_rule_test_with_dicom_file(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(get_testdata_file("CT_small.dcm"))
    assert main(["rule", "test", "--filter", "@Modality@ == 'CT' and float(@SliceThickness@) > 1",
                 "--file", path]) == 0
    out = capsys.readouterr().out
    assert "MATCH" in out and "SliceThickness" in out
    assert main(["rule", "test", "--filter", "@Modality@ == 'CT'", "--file", __file__]) == 2


def test_rule_test_with_a_file_warns_of_tags_the_router_does_not_see(capsys: pytest.CaptureFixture[str]) -> None:
    # The file has ImagePositionPatient, but the receiver extracts only settings.extract_tags.
    path = str(get_testdata_file("CT_small.dcm"))
    assert main(["rule", "test", "--filter", "@ImagePositionPatient@ != ''", "--file", path]) == 0
    out = capsys.readouterr().out
    assert "warning: ImagePositionPatient is not in the default settings.extract_tags" in out
    assert main(["rule", "test", "--filter", "@Modality@ == 'CT'", "--file", path]) == 0
    assert "warning" not in capsys.readouterr().out


def test_rule_test_with_series_from_stream(nats_url: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """No bookkeeper runs here: the command reads the series' first image.received from EVENTS."""
    async def publish() -> None:
        bus = await Bus.connect(nats_url, actor="test")
        try:
            store = LocalBlobStore(data_dir / "blobs")
            await send_series(bus, store, "2.1", "2.1.1", 2, {"Modality": "MR", "SeriesDescription": "Ax T2"})
            await send_series(bus, store, "2.1", "2.1.2", 2, {"Modality": "MR", "SeriesDescription": "Sag T1"})
        finally:
            await bus.close()

    asyncio.run(publish())
    monkeypatch.setenv("CADUCEUS_NATS_URL", nats_url)
    assert main(["rule", "test", "--filter", "@SeriesDescription@ == 'Sag T1'", "--series", "2.1.2"]) == 0
    out = capsys.readouterr().out
    assert "MATCH" in out and "EVENTS stream seq 3" in out
    assert main(["rule", "test", "--filter", "True", "--series", "9.9.9"]) == 2


@pytest.fixture
def configured(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    document = {
        "targets": {"pacs": {"type": "dicom", "host": "127.0.0.1", "port": 104, "called_aet": "PACS"},
                    "archive": {"type": "dicom", "host": "127.0.0.1", "port": 105, "called_aet": "ARCHIVE"}},
        "rules": {"ct-to-pacs": {"filter": "@Modality@ == 'CT'", "targets": ["pacs"], "priority": "urgent"},
                  "drop-scouts": {"filter": "'SCOUT' in @SeriesDescription@.upper()", "action": "discard"},
                  "mr-off": {"filter": "@Modality@ == 'MR'", "targets": ["pacs"], "disabled": True},
                  "rest": {"filter": "True", "targets": ["archive"], "fallback": True}}}

    async def apply() -> None:
        bus = await Bus.connect(nats_url, actor="test")
        try:
            await bus.publish_many(plan_changes({}, CaduceusConfig.parse(document), actor="user:test"))
        finally:
            await bus.close()

    asyncio.run(apply())
    monkeypatch.setenv("CADUCEUS_NATS_URL", nats_url)


@pytest.mark.parametrize(("tags", "code", "decision", "lines"), [
    ({"Modality": "CT", "SeriesDescription": "Axial"}, 0, "decision: route -> pacs (rule ct-to-pacs, urgent)",
     ["ct-to-pacs   MATCH", "mr-off       disabled", "rest         not evaluated: fallback, and another rule matched"]),
    ({"Modality": "CT", "SeriesDescription": "Scout"}, 1, "decision: discarded by rule drop-scouts",
     ["drop-scouts  MATCH", "rest         not evaluated: rule drop-scouts discarded the batch"]),
    ({"Modality": "US"}, 0, "decision: route -> archive (rule rest, normal)", ["ct-to-pacs   no match", "rest         MATCH"]),
])
def test_rule_test_without_a_filter_shows_what_the_configured_rules_decide(
        configured: None, tmp_path: Path, tags: dict[str, str], code: int, decision: str, lines: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tags.json"
    path.write_text(json.dumps(tags))
    assert main(["rule", "test", "--tags", str(path)]) == code
    out = capsys.readouterr().out
    assert decision in out, out
    for line in lines:
        assert line in out, out


def test_rule_test_of_a_configured_rule_by_name(configured: None, tags_file: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rule", "test", "--rule", "ct-to-pacs", "--tags", str(tags_file)]) == 0
    assert "MATCH" in capsys.readouterr().out
    assert main(["rule", "test", "--rule", "no-such-rule", "--tags", str(tags_file)]) == 2
    assert "no rule 'no-such-rule' in the configuration (rules: ct-to-pacs, drop-scouts, mr-off, rest)" \
        in capsys.readouterr().err
