"""`caduceus rule test [--filter EXPR | --rule NAME] (--tags FILE.json | --file x.dcm | --series UID)`.

With --filter (or --rule, a configured rule's filter): evaluates it the way the router does and
prints the result, the tag values the rule used and the tags that were missing. Without either:
every configured rule, and what the router would decide (cli/rule_preview.py). Exit status: 0
match (tasks would be created), 1 no match (discarded), 2 error (syntax error, run-time error of
the rule, unreadable input, unknown series or rule).

Tag sources:
- `--tags FILE.json`: a JSON object keyword -> value (values are turned into strings, a list into its values joined by backslashes, as the receiver extracts multi-valued elements);
- `--file x.dcm`: the DICOM file's tags, read without pixel data (shared/dicomtags.py);
- `--series UID`: the tags of the series' first `image.received` event (what the router
  evaluates), asked from the bookkeeper; when no bookkeeper answers, read from the EVENTS stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, cast

from cli.connection import (
    add_connection_arguments,
    cli_nats_url,
    connect_cli_bus,
    default_actor,
    run_with_bus,
)
from cli.rule_preview import preview, render
from shared.config.model import DEFAULT_EXTRACT_TAGS, CaduceusConfig
from shared.config.state import fold, read_all
from shared.rules import ASSOCIATION_TAGS, CompiledRule, RuleResult, RuleSyntaxError, compile_rule

EXIT_MATCH, EXIT_NO_MATCH, EXIT_ERROR = 0, 1, 2


class SourceError(RuntimeError):
    """The tags could not be read."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("rule", help="work with routing rules")
    rule_sub = parser.add_subparsers(dest="rule_command", required=True)
    test = rule_sub.add_parser("test", help="evaluate a rule filter against tags, a DICOM file or a series",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = test.add_mutually_exclusive_group()
    which.add_argument("--filter", dest="filter_expr", metavar="EXPR", help="a rule filter")
    which.add_argument("--rule", metavar="NAME", help="a configured rule (its filter)")
    source = test.add_mutually_exclusive_group(required=True)
    source.add_argument("--tags", type=Path, metavar="FILE.json", help="JSON object of tag keyword -> value")
    source.add_argument("--file", type=Path, metavar="FILE.dcm", help="a DICOM file")
    source.add_argument("--series", metavar="UID", help="a received series (its first instance's tags)")
    test.add_argument("--json", action="store_true", help="print the result as JSON")
    add_connection_arguments(test)  # for --series, --rule and the configured rules
    test.set_defaults(func=run_test)


def run_test(args: argparse.Namespace) -> int:
    if args.filter_expr is None:
        try:
            config = _current_config(cli_nats_url(args))
        except SourceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if args.rule is None:
            return _run_preview(args, config)
        if args.rule not in config.rules:
            print(f"error: no rule {args.rule!r} in the configuration (rules: {', '.join(sorted(config.rules)) or 'none'})",
                  file=sys.stderr)
            return EXIT_ERROR
        args.filter_expr = config.rules[args.rule].filter
    try:
        rule = compile_rule(args.filter_expr)
    except RuleSyntaxError as exc:
        _print_syntax_error(args.filter_expr, exc)
        return EXIT_ERROR
    try:
        tags, origin = _load_tags(args, rule)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    result = rule.evaluate(tags)
    # A series' tags are what the receiver extracted; a file or JSON may hold tags the router never sees.
    warnings = rule.warnings + ([] if args.series else _not_extracted_by_default(rule))
    if args.json:
        print(json.dumps({"matched": result.matched, "error": result.error, "used_tags": result.used_tags,
                          "missing_tags": result.missing_tags, "warnings": warnings, "source": origin},
                         indent=2))
    else:
        _print_result(result, origin, warnings)
    if result.error:
        return EXIT_ERROR
    return EXIT_MATCH if result.matched else EXIT_NO_MATCH


def _run_preview(args: argparse.Namespace, config: CaduceusConfig) -> int:
    """Every configured rule on these tags, and the decision, per trigger."""
    try:
        tags, origin = _load_tags(args, None, config.settings.extract_tags)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    triggers = [t for t in ("series", "study") if any(r.trigger == t for r in config.rules.values())]
    results = [preview(config, tags, trigger) for trigger in triggers]
    if args.json:
        print(json.dumps({"source": origin, "decisions": {r.trigger: r.decision for r in results}, "rules": {
            line.name: {"matched": line.result.matched, "error": line.result.error,
                        "missing_tags": line.result.missing_tags} if line.result else {"note": line.note}
            for r in results for line in r.lines}}, indent=2))
    else:
        print(f"tags from: {origin}")
        for result in results:
            print("\n".join(render(result)))
        if not results:
            print("no rules configured: every series is discarded (files kept, recoverable)")
    return EXIT_MATCH if any(r.creates_tasks for r in results) else EXIT_NO_MATCH


def _current_config(url: str) -> CaduceusConfig:
    async def read(bus: Any) -> CaduceusConfig:
        return CaduceusConfig.from_items(fold(await read_all(bus)))

    try:
        return run_with_bus(url, default_actor(), read)
    except Exception as exc:  # noqa: BLE001 - no broker, or a configuration this version cannot read
        raise SourceError(f"cannot read the configuration from NATS at {url}: {exc}") from None


def _print_syntax_error(expr: str, exc: RuleSyntaxError) -> None:
    print(f"error: invalid rule: {exc}", file=sys.stderr)
    if exc.column is not None and "\n" not in expr:
        print(f"  {expr.strip()}", file=sys.stderr)
        print("  " + " " * (exc.column - 1) + "^", file=sys.stderr)


def _not_extracted_by_default(rule: CompiledRule) -> list[str]:
    return [f"{tag} is not in the default settings.extract_tags: the router sees it (else empty) only if "
            f"the configuration adds it" for tag in rule.tags
            if tag not in DEFAULT_EXTRACT_TAGS and tag not in rule.unknown_tags and tag not in ASSOCIATION_TAGS]


def _print_result(result: RuleResult, origin: str, warnings: list[str]) -> None:
    if result.error:
        print(f"ERROR: {result.error} (counts as no match)")
    else:
        print("MATCH" if result.matched else "NO MATCH")
    print(f"tags from: {origin}")
    if result.used_tags:
        print("tags used:")
        width = max(len(k) for k in result.used_tags)
        for keyword, value in result.used_tags.items():
            mark = "   (missing)" if keyword in result.missing_tags else ""
            print(f"  {keyword.ljust(width)} = {value!r}{mark}")
    if result.missing_tags:
        print(f"missing tags: {', '.join(result.missing_tags)}")
    for warning in warnings:
        print(f"warning: {warning}")


def _load_tags(args: argparse.Namespace, rule: CompiledRule | None,
               extract: list[str] = DEFAULT_EXTRACT_TAGS) -> tuple[dict[str, str], str]:
    if args.tags is not None:
        return _tags_from_json(args.tags), str(args.tags)
    if args.file is not None:
        return _tags_from_dicom(args.file, [*extract, *(rule.tags if rule else [])]), str(args.file)
    return _tags_from_series(args.series, cli_nats_url(args))


def _tags_from_json(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object of tag keyword -> value")
    return {str(k): _tag_value(v) for k, v in data.items()}


def _tag_value(value: object) -> str:
    # As the receiver extracts them: a multi-valued element is its values joined by backslashes.
    if value is None:
        return ""
    if isinstance(value, list):
        return "\\".join(_tag_value(item) for item in value)
    return str(value)


def _tags_from_dicom(path: Path, keywords: list[str]) -> dict[str, str]:
    from shared.dicomtags import TagExtractionError, extract_tags

    try:
        extracted = extract_tags(path, keywords)
    except (OSError, TagExtractionError) as exc:
        raise SourceError(f"cannot read DICOM file {path}: {exc}") from None
    for warning in extracted.warnings:
        print(f"note: {warning}", file=sys.stderr)
    return extracted.tags


def _tags_from_series(series_uid: str, url: str) -> tuple[dict[str, str], str]:

    async def lookup() -> tuple[dict[str, str], str]:
        try:
            bus = await connect_cli_bus(url, default_actor())
        except Exception as exc:  # noqa: BLE001 - no broker: say so
            raise SourceError(f"cannot reach NATS: {exc}") from None
        try:
            return await first_instance_tags(bus, series_uid)
        finally:
            await bus.close()

    return asyncio.run(lookup())


async def first_instance_tags(bus: Any, series_uid: str) -> tuple[dict[str, str], str]:
    """Tags of the series' first image.received: from the bookkeeper, else from the stream."""
    from shared.bookkeeper_client import BookkeeperClient, BookkeeperUnavailable

    try:
        page = await BookkeeperClient(bus, timeout=5).events(
            series_uid=series_uid, type="image.received", stream="EVENTS", limit=1)
    except BookkeeperUnavailable:
        return await _first_instance_from_stream(bus, series_uid)
    if not page.events:
        # Not stored yet (it arrived a moment ago), or stored under another bookkeeper: the stream.
        return await _first_instance_from_stream(bus, series_uid)
    record = page.events[0]
    return dict(record.payload.get("tags") or {}), f"bookkeeper: EVENTS seq {record.stream_seq}"


async def _first_instance_from_stream(bus: Any, series_uid: str) -> tuple[dict[str, str], str]:
    from shared.bus import replay
    from shared.events import Event
    from shared.subjects import event_subject

    # replay() is an async generator: close it (and its consumer) as soon as the series is found.
    events_gen = cast(AsyncGenerator[Event, None], replay(bus, event_subject("image.received"), idle_timeout=3))
    async with contextlib.aclosing(events_gen) as events:
        async for event in events:
            if event.series_uid == series_uid:
                return dict(event.payload.get("tags") or {}), f"EVENTS stream seq {event.stream_seq}"
    raise SourceError(f"no image.received for series {series_uid} on the EVENTS stream")
