"""The configuration schema. What `caduceus config apply` validates and what services fold.

Top level: `settings` (one mapping), `targets`, `rules`, `modules` (each a mapping of name -> item).
Every item may carry `owner` and `description`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.subjects import DEFAULT_EVENTS_RETENTION_DAYS

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")

DEFAULT_EXTRACT_TAGS = [
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
    "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber",
    "ReferringPhysicianName", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate",
    "SeriesTime", "Modality", "BodyPartExamined", "ProtocolName", "SOPClassUID", "SOPInstanceUID",
    "InstanceNumber", "AcquisitionNumber", "ImageType", "Manufacturer", "ManufacturerModelName",
    "StationName", "DeviceSerialNumber", "SoftwareVersions", "InstitutionName", "InstitutionalDepartmentName",
    "MagneticFieldStrength", "SliceThickness", "SpacingBetweenSlices", "ContrastBolusAgent",
    "ContrastBolusRoute", "ContrastBolusVolume", "ScanningSequence", "SequenceName", "SequenceVariant",
    "KVP", "XRayTubeCurrent", "ConvolutionKernel", "Rows", "Columns", "NumberOfFrames",
    "PhotometricInterpretation", "RequestingPhysician", "RequestedProcedureDescription",
    "PerformedProcedureStepDescription", "SpecificCharacterSet", "ScheduledProcedureStepDescription",
]


DAY_SECONDS = 86400
WEEK_SECONDS = 7 * DAY_SECONDS
MONTH_SECONDS = 31 * DAY_SECONDS
MAX_PDU = 2**32 - 1
# What events_retention_days must leave beyond the longest wait the configuration allows: time for
# an operator to notice a stopped consumer (a bookkeeper, a dispatcher) before its events expire.
RETENTION_MARGIN_SECONDS = 7 * DAY_SECONDS


class ConfigError(ValueError):
    """A configuration that cannot be applied; the message says which item and why."""


# DCMTK refuses to negotiate a maximum PDU below this (ASC_MINIMUMPDUSIZE); pynetdicom fails below 8.
MIN_PDU = 4096
# Validation context of a configuration being applied (CaduceusConfig.parse). Checks added after a
# release apply only then: items already stored on the CONFIG stream, which an older version
# accepted, must still fold, or every service would fall back to an empty configuration.
NEW_INPUT = {"new_input": True}


def _new_input(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("new_input"))


def check_ae_title(value: str) -> str:
    """An AE title as PS3.5 allows it: 1-16 characters, no backslash or control character, not blank."""
    if not value.strip():
        raise ValueError("an AE title cannot be empty or only spaces")
    if len(value) > 16:
        raise ValueError(f"AE title {value!r} is longer than 16 characters")
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        raise ValueError(f"AE title {value!r} may hold only printable ASCII characters other than a backslash")
    return value


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str = ""
    description: str = ""


class SettingsItem(Item):
    # receiver
    ae_title: str = Field(default="CADUCEUS", min_length=1, max_length=16)
    require_called_aet: bool = False
    allowed_calling_aets: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list, description="IP addresses or CIDR networks")
    # The PDU length field is 4 bytes: a larger value could not be encoded in the A-ASSOCIATE-AC,
    # and every association would fail.
    max_pdu: int = Field(default=0, ge=0, le=MAX_PDU, description="0 = unlimited")
    max_connections_per_host: int = Field(
        default=0, ge=0, le=232,
        description="open connections one peer address may hold at the receiver (0 = no per-host limit)")
    min_free_space_mb: int = Field(default=500, ge=0, le=10**9)
    # Large instances (services/receiver/spool.py): a data set is held in memory up to
    # spool_threshold_mb; beyond, it goes to a temp file of the blob store as it arrives. One above
    # max_instance_mb is refused (0xA700) as soon as it passes it; 0 = no limit (then only
    # min_free_space_mb stops an endless one).
    spool_threshold_mb: int = Field(default=32, ge=1, le=4096)
    max_instance_mb: int = Field(default=4096, ge=0, le=10**6, description="0 = no limit")
    # What the associations of one receiver process may hold in memory at once of data sets above
    # 1 MB (each counted twice: storing one from memory copies it); past it, a growing data set
    # goes to its temp file at once, below spool_threshold_mb too. 0 = no budget (then each
    # association may hold up to spool_threshold_mb).
    spool_memory_budget_mb: int = Field(default=128, ge=0, le=10**6, description="0 = no budget")

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str, info: ValidationInfo) -> str:
        return check_ae_title(value) if _new_input(info) else value

    @field_validator("allowed_calling_aets")
    @classmethod
    def _calling_aets(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [check_ae_title(aet) for aet in value] if _new_input(info) else value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for entry in value if _new_input(info) else []:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                # Names are not resolved: the receiver compares the peer's address only.
                raise ValueError(f"{entry!r} is not an IP address or CIDR network (e.g. 10.1.2.3 or "
                                 "10.1.0.0/16); host names are not accepted") from None
        return value

    @field_validator("max_pdu")
    @classmethod
    def _max_pdu(cls, value: int, info: ValidationInfo) -> int:
        if _new_input(info) and 0 < value < MIN_PDU:
            raise ValueError(f"must be 0 (unlimited) or at least {MIN_PDU}: senders refuse a smaller maximum PDU")
        return value
    extract_tags: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTRACT_TAGS))
    tls_certificate: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    # router
    # Upper bounds on times: `inf` or 1e308 passed the old checks and then broke the services that
    # schedule with them (a NAK delay or a date that cannot be represented); a week or a month is
    # already far beyond any sensible setting.
    series_complete_seconds: float = Field(default=60, gt=0, le=WEEK_SECONDS)
    study_complete_seconds: float = Field(default=900, gt=0, le=WEEK_SECONDS)
    study_force_complete_seconds: float = Field(default=5400, gt=0, le=MONTH_SECONDS)
    # dispatcher
    dispatch_retries: int = Field(default=5, ge=0, le=1000)
    dispatch_retry_wait_seconds: float = Field(default=60, ge=0, le=DAY_SECONDS)
    dispatch_retry_max_wait_seconds: float = Field(default=3600, ge=0, le=WEEK_SECONDS)
    dispatch_parallel_associations: int = Field(default=1, ge=1, le=16)
    # scheduling and retention
    offpeak_start: str = Field(default="22:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    offpeak_end: str = Field(default="06:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    retention_days: float = Field(default=3, ge=0, le=36500)
    # How long the EVENTS stream keeps events (the bookkeeper's database is the permanent log; the
    # stream is the work queue and the replay buffer). The bookkeeper applies it to the stream, and
    # check_references requires it to outlast every wait that needs an event to stay on the stream.
    events_retention_days: float = Field(default=DEFAULT_EVENTS_RETENTION_DAYS, ge=8, le=3650)


class TlsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    certificate: str = ""
    key: str = ""
    ca: str = ""


class DicomTarget(Item):
    type: Literal["dicom"] = "dicom"
    host: str = Field(min_length=1, description="host name, IP, or 'sender' to send back to the source")
    port: int = Field(ge=1, le=65535)
    called_aet: str = Field(min_length=1, max_length=16)
    calling_aet: str = Field(default="CADUCEUS", min_length=1, max_length=16)
    tls: TlsConfig | None = None
    parallel_associations: int | None = Field(default=None, ge=1, le=16)
    # Associations one dispatcher process holds open to this target at once, across its tasks (None:
    # no limit). Tasks beyond it wait for their turn instead of being rejected by a peer that allows
    # fewer; a task's parallel_associations never exceeds it.
    max_associations: int | None = Field(default=None, ge=1, le=1000)

    @field_validator("called_aet", "calling_aet")
    @classmethod
    def _ae_titles(cls, value: str, info: ValidationInfo) -> str:
        return check_ae_title(value) if _new_input(info) else value


Target = Annotated[DicomTarget, Field(discriminator="type")]


class Rule(Item):
    filter: str = Field(default="True", min_length=1)
    trigger: Literal["series", "study"] = "series"
    action: Literal["route", "process", "both", "discard", "notification"] = "route"
    targets: list[str] = Field(default_factory=list)
    modules: list[str] = Field(default_factory=list)
    priority: Literal["normal", "urgent", "offpeak"] = "normal"
    disabled: bool = False
    fallback: bool = False
    series_complete_seconds: float | None = Field(default=None, gt=0, le=WEEK_SECONDS)
    study_required_series: str = ""
    study_force_action: Literal["proceed", "discard", "ignore"] = "proceed"
    notification_message: str = ""

    @field_validator("targets", "modules", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _action_needs(self) -> Rule:
        if self.action in ("route", "both") and not self.targets:
            raise ValueError(f"action '{self.action}' needs at least one target")
        if self.action in ("process", "both") and not self.modules:
            raise ValueError(f"action '{self.action}' needs at least one module")
        return self


class Module(Item):
    image: str = Field(min_length=1, description="container image (tag) to run")
    settings: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: float = Field(default=3600, gt=0, le=WEEK_SECONDS)


KINDS = ("settings", "targets", "rules", "modules")


class CaduceusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    settings: SettingsItem = Field(default_factory=SettingsItem)
    targets: dict[str, Target] = Field(default_factory=dict)
    rules: dict[str, Rule] = Field(default_factory=dict)
    modules: dict[str, Module] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_target_type(cls, raw: Any) -> Any:
        """A target without `type` is a DICOM target (the discriminator itself has no default)."""
        if isinstance(raw, dict) and isinstance(raw.get("targets"), dict):
            raw = {**raw, "targets": {name: ({"type": "dicom", **item} if isinstance(item, dict)
                                             and "type" not in item else item)
                                      for name, item in raw["targets"].items()}}
        return raw

    @classmethod
    def parse(cls, raw: Any) -> CaduceusConfig:
        """Validate a whole configuration, with messages that name the offending item."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError("configuration must be a mapping with settings/targets/rules/modules")
        unknown = set(raw) - set(KINDS)
        if unknown:
            raise ConfigError(f"unknown top-level key(s): {', '.join(sorted(unknown))} "
                              f"(expected {', '.join(KINDS)})")
        try:
            config = cls.model_validate(raw, context=NEW_INPUT)
        except ValidationError as exc:
            raise ConfigError(_explain(exc)) from None
        config.check_references()
        return config

    def check_references(self) -> None:
        from shared.rules import RuleSyntaxError, compile_rule
        from shared.series_list import compile_series_list

        problems: list[str] = []
        for kind in ("targets", "rules", "modules"):
            for name in getattr(self, kind):
                if not NAME_RE.match(name):
                    problems.append(f"{kind}.{name}: names are 1-64 letters, digits, space, '_', '-', '.'")
        for name, rule in self.rules.items():
            for target in rule.targets:
                if target not in self.targets:
                    problems.append(f"rules.{name}.targets: unknown target '{target}'")
            for module in rule.modules:
                if module not in self.modules:
                    problems.append(f"rules.{name}.modules: unknown module '{module}'")
            try:
                compile_rule(rule.filter)
            except RuleSyntaxError as exc:
                problems.append(f"rules.{name}.filter: {exc}")
            if rule.study_required_series:
                try:
                    compile_series_list(rule.study_required_series)
                except RuleSyntaxError as exc:
                    problems.append(f"rules.{name}.study_required_series: {exc}")
        problems += self._retention_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def warnings(self) -> list[str]:
        """Valid but probably not meant: a rule naming a tag that is no DICOM keyword, or one the
        receiver does not extract (rules see only settings.extract_tags; any other tag is empty)."""
        from shared.rules import ASSOCIATION_TAGS, RuleSyntaxError, compile_rule

        extracted = set(self.settings.extract_tags) | set(ASSOCIATION_TAGS)
        found: list[str] = []
        for name, rule in self.rules.items():
            try:
                compiled = compile_rule(rule.filter)
            except RuleSyntaxError:
                continue  # check_references reports it
            found += [f"rules.{name}.filter: {warning}" for warning in compiled.warnings]
            for tag in compiled.tags:
                if tag not in extracted and tag not in compiled.unknown_tags:
                    found.append(f"rules.{name}.filter: {tag} is not in settings.extract_tags, so the router "
                                 f"always sees it empty; add it there if the rule needs it")
        return found + self._tls_file_warnings() + self._association_warnings()

    def _association_warnings(self) -> list[str]:
        found = []
        for name, target in self.targets.items():
            parallel = target.parallel_associations or self.settings.dispatch_parallel_associations
            if target.max_associations is not None and parallel > target.max_associations:
                found.append(f"targets.{name}: a task would open {parallel} parallel associations, but "
                             f"max_associations is {target.max_associations}: it opens at most that many")
        return found

    def _tls_file_warnings(self) -> list[str]:
        # Only a warning: the configuration may be applied from another host than the services'.
        files = [(f"settings.{field}", getattr(self.settings, field))
                 for field in ("tls_certificate", "tls_key", "tls_ca")]
        for name, target in self.targets.items():
            if target.tls is not None:
                files += [(f"targets.{name}.tls.{field}", getattr(target.tls, field))
                          for field in ("certificate", "key", "ca")]
        return [f"{where}: {path} is not a readable file on this host; it must be one where the "
                "receiver or dispatcher runs, or their TLS will not work"
                for where, path in files if path and not (os.path.isfile(path) and os.access(path, os.R_OK))]

    def longest_stream_wait_seconds(self) -> tuple[float, str]:
        """The longest an event may have to stay on the EVENTS stream under this configuration, and why.

        An open study is folded again from its first event after a router restart until it is
        forced complete; a dispatch task stays on its work queue through all its retry waits (each
        capped at dispatch_retry_max_wait_seconds) and up to a day's wait for the off-peak window.
        """
        settings = self.settings
        series_wait = max([settings.series_complete_seconds] + [
            rule.series_complete_seconds for rule in self.rules.values() if rule.series_complete_seconds])
        study = settings.study_force_complete_seconds + max(series_wait, settings.study_complete_seconds)
        retry_waits = sum(min(settings.dispatch_retry_max_wait_seconds,
                              settings.dispatch_retry_wait_seconds * 2 ** min(attempt, 60))
                          for attempt in range(settings.dispatch_retries))
        dispatch = retry_waits + DAY_SECONDS
        if dispatch >= study:
            return dispatch, (f"a dispatch task's retry waits ({settings.dispatch_retries} retries, "
                              f"{_duration(retry_waits)}) plus a day for the off-peak window")
        return study, "an open study until it is forced complete (study_force_complete_seconds)"

    def _retention_problems(self) -> list[str]:
        wait, why = self.longest_stream_wait_seconds()
        needed = wait + RETENTION_MARGIN_SECONDS
        if self.settings.events_retention_days * DAY_SECONDS >= needed:
            return []
        return [f"settings.events_retention_days: {self.settings.events_retention_days:g} days is too short: "
                f"{why} can keep an event on the EVENTS stream for {_duration(wait)}, and retention must "
                f"leave 7 days beyond that; set it to at least {math.ceil(needed / DAY_SECONDS * 10) / 10:g}, or shorten the wait"]

    def items(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Flatten to (kind, name) -> item dict, the unit that config events carry."""
        flat: dict[tuple[str, str], dict[str, Any]] = {
            ("settings", "global"): self.settings.model_dump(mode="json", exclude_defaults=True)}
        for kind in ("targets", "rules", "modules"):
            for name, item in getattr(self, kind).items():
                flat[(kind, name)] = _dump_item(item)
        return flat

    @classmethod
    def from_items(cls, items: dict[tuple[str, str], dict[str, Any]]) -> CaduceusConfig:
        return cls.model_validate(raw_document(items))

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"settings": self.settings.model_dump(mode="json", exclude_defaults=True)}
        for kind in ("targets", "rules", "modules"):
            doc[kind] = {n: _dump_item(i) for n, i in getattr(self, kind).items()}
        return doc


def raw_document(items: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """(kind, name) -> item, back into the document shape, without validating anything."""
    raw: dict[str, Any] = {"settings": {}, "targets": {}, "rules": {}, "modules": {}}
    for (kind, name), item in sorted(items.items()):
        if kind == "settings":
            raw["settings"] = item
        else:
            raw.setdefault(kind, {})[name] = item
    return raw


def _dump_item(item: BaseModel) -> dict[str, Any]:
    """Non-default fields, but always the `type` discriminator (targets), or the item cannot be read back."""
    data = item.model_dump(mode="json", exclude_defaults=True)
    if "type" in type(item).model_fields:
        data = {"type": item.type, **data}  # type: ignore[attr-defined]
    return data


def _duration(seconds: float) -> str:
    if seconds >= DAY_SECONDS:
        return f"{seconds / DAY_SECONDS:.1f} days"
    return f"{seconds / 3600:.1f} hours"


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        where = where.replace(".dicom.", ".")  # discriminated-union noise
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)
