"""`caduceus config apply/show/history` against a real nats-server (in-process CLI calls)."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.config_cmd import ConcurrentChange, apply_config, plan_apply, publish_plan
from cli.main import main
from shared.bus import Bus
from shared.config.model import CaduceusConfig
from shared.settings import UP_STATE_FILE

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "example-config.yaml"


def history(cli) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    code, out, _ = cli("config", "history", "--json")
    assert code == 0
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def test_apply_example_then_show_and_history(cli) -> None:  # type: ignore[no-untyped-def]
    code, out, err = cli("config", "apply", str(EXAMPLE), "--comment", "initial setup")
    assert code == 0, err
    assert "created  targets/pacs" in out and "created  rules/everything-else" in out

    code, out, _ = cli("config", "show", "--json")
    assert code == 0
    expected = CaduceusConfig.parse(yaml.safe_load(EXAMPLE.read_text())).to_document()
    assert json.loads(out) == expected
    assert json.loads(out)["targets"]["pacs"]["type"] == "dicom"

    code, out, _ = cli("config", "show")  # YAML by default
    assert code == 0 and yaml.safe_load(out) == expected

    rows = history(cli)
    assert len(rows) == len(CaduceusConfig.parse(yaml.safe_load(EXAMPLE.read_text())).items())
    assert {r["actor"] for r in rows} == {f"user:{getpass.getuser()}"}
    assert {r["comment"] for r in rows} == {"initial setup"}
    assert {r["type"] for r in rows} == {"config.item.created"}
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    assert ("rules", "ct-to-pacs") in {(r["kind"], r["name"]) for r in rows}

    code, out, _ = cli("config", "history")
    assert code == 0 and "rules/ct-to-pacs" in out and "# initial setup" in out


def test_reapply_same_file_publishes_nothing(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("config", "apply", str(EXAMPLE))[0] == 0
    before = history(cli)
    code, out, _ = cli("config", "apply", str(EXAMPLE), "--actor", "user:someone-else")
    assert code == 0 and out.splitlines()[0] == "no changes"
    assert "no service is running" in out
    assert history(cli) == before


@pytest.mark.parametrize("document, message", [
    ({"targets": {"pacs": {"host": "127.0.0.1", "port": 104, "called_aet": "PACS"}},
      "rules": {"r": {"filter": "True", "targets": ["nowhere"]}}}, "rules.r.targets: unknown target 'nowhere'"),
    ({"targets": {"pacs": {"host": "127.0.0.1", "port": 104, "called_aet": "PACS"}},
      "rules": {"r": {"filter": "@Modality@ ==", "targets": ["pacs"]}}}, "rules.r.filter"),
    ({"targets": {"pacs": {"port": 104, "called_aet": "PACS"}}}, "targets.pacs.host"),
    ({"rules": {"r": {"filter": "True", "action": "route"}}}, "needs at least one target"),
    ({"rulez": {}}, "unknown top-level key"),
    ({"rules": {"r": {"filter": "__import__('os').system('true')", "action": "discard"}}}, "rules.r.filter"),
])
def test_invalid_config_exits_2_and_publishes_nothing(cli, tmp_path: Path, document: dict[str, Any],  # type: ignore[no-untyped-def]
                                                      message: str) -> None:
    code, out, err = cli("config", "apply", str(write_yaml(tmp_path / "bad.yaml", document)))
    assert code == 2
    assert message in err and "nothing applied" in err
    assert history(cli) == []


def test_invalid_after_valid_changes_nothing(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("config", "apply", str(EXAMPLE))[0] == 0
    before = history(cli)
    broken = yaml.safe_load(EXAMPLE.read_text())
    broken["rules"]["ct-to-pacs"]["targets"] = ["pacs", "ghost"]
    del broken["targets"]["research-archive"]  # would be a deletion, but the whole document is refused
    code, _, err = cli("config", "apply", str(write_yaml(tmp_path / "c.yaml", broken)))
    assert code == 2 and "unknown target 'ghost'" in err
    assert history(cli) == before


def test_unparseable_files_exit_2(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad_yaml = tmp_path / "c.yaml"
    bad_yaml.write_text("targets: [unclosed\n")
    assert cli("config", "apply", str(bad_yaml))[0] == 2
    bad_json = tmp_path / "c.json"
    bad_json.write_text('{"targets": ')
    code, _, err = cli("config", "apply", str(bad_json))
    assert code == 2 and "not valid JSON" in err
    code, _, err = cli("config", "apply", str(tmp_path / "missing.yaml"))
    assert code == 2 and "cannot read" in err
    assert history(cli) == []


def test_an_empty_file_deletes_nothing(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("config", "apply", str(EXAMPLE))[0] == 0
    before = len(history(cli))
    for text in ("", "# nothing here\n", "{}\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        code, _, err = cli("config", "apply", str(empty))
        assert code == 2 and "is empty" in err and "targets: {} and rules: {}" in err, err
    assert len(history(cli)) == before
    explicit = write_yaml(tmp_path / "none.yaml", {"targets": {}, "rules": {}})
    code, out, _ = cli("config", "apply", str(explicit))
    assert code == 0 and "deleted  targets/pacs" in out


def test_apply_warns_of_rules_that_cannot_match_as_meant(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    document = {"targets": {"a": {"type": "dicom", "host": "127.0.0.1", "port": 104, "called_aet": "A"}},
                "rules": {"typo": {"filter": "@Modaliy@ == 'CT'", "targets": ["a"]},
                          "unextracted": {"filter": "@ImagePositionPatient@ != ''", "targets": ["a"]},
                          "fine": {"filter": "@Modality@ == 'CT'", "targets": ["a"]}}}
    code, _, err = cli("config", "apply", str(write_yaml(tmp_path / "c.yaml", document)), "--dry-run")
    assert code == 0
    assert "warning: rules.typo.filter: 'Modaliy' is not a DICOM keyword (did you mean Modality?)" in err
    assert "warning: rules.unextracted.filter: ImagePositionPatient is not in settings.extract_tags" in err
    assert "rules.fine" not in err and err.count("warning") == 2


def test_update_and_delete(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("config", "apply", str(EXAMPLE))[0] == 0
    count = len(history(cli))
    changed = yaml.safe_load(EXAMPLE.read_text())
    changed["targets"]["pacs"]["port"] = 4343
    del changed["rules"]["ct-head-research"]
    del changed["targets"]["research-archive"]  # only ct-head-research used it
    code, out, err = cli("config", "apply", str(write_yaml(tmp_path / "v2.yaml", changed)), "--comment", "v2",
                         "--actor", "user:alice")
    assert code == 0, err
    assert "updated  targets/pacs (port)" in out, out  # which fields of an item changed
    rows = history(cli)[count:]
    assert {(r["type"], r["kind"], r["name"]) for r in rows} == {
        ("config.item.updated", "targets", "pacs"),
        ("config.item.deleted", "rules", "ct-head-research"),
        ("config.item.deleted", "targets", "research-archive"),
    }
    assert {r["actor"] for r in rows} == {"user:alice"} and {r["comment"] for r in rows} == {"v2"}
    shown = json.loads(cli("config", "show", "--json")[1])
    assert shown["targets"]["pacs"]["port"] == 4343
    assert "ct-head-research" not in shown["rules"] and "research-archive" not in shown["targets"]

    # Settings are never deleted: a document without them resets them to defaults (an empty file is refused).
    code, out, _ = cli("config", "apply", str(write_yaml(tmp_path / "none.yaml", {"targets": {}, "rules": {}})))
    assert code == 0
    shown = json.loads(cli("config", "show", "--json")[1])
    assert shown == {"settings": {}, "targets": {}, "rules": {}, "modules": {}}


def test_dry_run_publishes_nothing(cli) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = cli("config", "apply", str(EXAMPLE), "--dry-run")
    assert code == 0 and out.startswith("would apply")
    assert history(cli) == []


def test_json_file(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    document = {"targets": {"a": {"host": "127.0.0.1", "port": 104, "called_aet": "A"}},
                "rules": {"all": {"filter": "True", "targets": "a"}}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(document))
    assert cli("config", "apply", str(path))[0] == 0
    shown = json.loads(cli("config", "show", "--json")[1])
    assert shown["rules"]["all"]["targets"] == ["a"]


def test_cli_finds_nats_through_up_state_file(nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CADUCEUS_NATS_URL", raising=False)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / UP_STATE_FILE).write_text(json.dumps({"nats_url": nats_url}))
    assert main(["config", "apply", str(EXAMPLE), "--data-dir", str(data_dir)]) == 0
    capsys.readouterr()
    monkeypatch.setenv("CADUCEUS_DATA_DIR", str(data_dir))
    assert main(["config", "show", "--json"]) == 0
    assert "pacs" in json.loads(capsys.readouterr().out)["targets"]


@pytest.mark.parametrize("argv", [["status"], ["config", "show"], ["config", "history"],
                                  ["config", "apply", str(EXAMPLE)], ["retry", "some-task"],
                                  ["study", "complete", "1.2.3"], ["bookkeeper", "events"],
                                  ["bookkeeper", "history", "1.2.3"], ["rule", "test", "--filter", "True",
                                                                       "--series", "1.2.3"]])
def test_without_a_running_caduceus_commands_say_so_and_touch_no_other_nats(
        argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Before, they fell back to nats://127.0.0.1:4222 (on this machine a NATS of its own) and
    # declared caduceus's streams there.
    monkeypatch.delenv("CADUCEUS_NATS_URL", raising=False)
    monkeypatch.setenv("CADUCEUS_DATA_DIR", str(tmp_path / "stopped"))
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert f"no running `caduceus up` found in {tmp_path / 'stopped'}" in err and "--nats-url" in err


def test_bookkeeper_and_retry_commands_take_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CADUCEUS_NATS_URL", raising=False)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / UP_STATE_FILE).write_text(json.dumps({"nats_url": "nats://127.0.0.1:1"}))  # nobody listens
    for argv in (["bookkeeper", "events"], ["retry", "some-task"]):
        assert main([*argv, "--data-dir", str(data_dir)]) == 3
        assert "nats://127.0.0.1:1" in capsys.readouterr().err


async def test_concurrent_apply_is_refused_not_mixed(bus: Bus) -> None:
    example = CaduceusConfig.parse(yaml.safe_load(EXAMPLE.read_text()))
    stale_plan, based_on = await plan_apply(bus, example, "user:alice")
    other = CaduceusConfig.parse({"targets": {"x": {"host": "127.0.0.1", "port": 104, "called_aet": "X"}}})
    await apply_config(bus, other, "user:bob")  # lands between alice's read and her publish
    seq_after_bob = await bus.last_seq("CONFIG")
    with pytest.raises(ConcurrentChange, match="0 of 9"):
        await publish_plan(bus, stale_plan, based_on)
    assert await bus.last_seq("CONFIG") == seq_after_bob
    # Re-planning against the new state works.
    assert len(await apply_config(bus, example, "user:alice")) == 10  # 9 items + deletion of x
