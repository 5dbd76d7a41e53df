"""Load a manifest: YAML in, a validated :class:`Manifest` out, or every problem at once.

Pure apart from :func:`load_manifest` reading one file; it never touches the network. Each job
is checked against its own model's fields from the catalogue, and each problem points at the
line to fix and says what was expected and what was found: a batch that fails on job 37 after
an hour of generating is exactly what this module exists to prevent.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalogue import ALL_FIELDS, MODELS, ModelSpec
from .errors import ManifestError, Problem
from .jobs import Job, Manifest, ManifestSettings
from .manifest_checks import (
    Defaults,
    Report,
    derived_id,
    describe,
    id_problem,
    is_int,
    model_problem,
    not_accepted,
    show,
    unquote_hint,
)
from .yamlpos import Document, YamlSyntaxError, compose
from .yamlpos import Path as KeyPath

__all__ = ["load_manifest", "parse_manifest"]

VERSION = 1
TOP_KEYS = ("version", "settings", "defaults", "jobs")
SETTING_LIMITS: dict[str, tuple[int, int]] = {
    "concurrency": (1, 10_000),
    "download_concurrency": (1, 64),
}
BOOL_SETTINGS = ("resubmit_uncertain", "retry_failed")
SETTING_KEYS = (
    "concurrency",
    "job_timeout_s",
    "download_concurrency",
    *BOOL_SETTINGS,
    "notify_url",
)
JOB_KEYS = ("id", "model", *sorted(ALL_FIELDS))


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest file; raise :class:`ManifestError` listing every problem."""
    file = os.fspath(path)
    try:
        raw = Path(file).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ManifestError([Problem(file, f"cannot read the manifest: {reason}")]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        column = len(raw[line_start : exc.start].decode("utf-8", "replace")) + 1
        message = f"the manifest is not UTF-8 text (byte 0x{raw[exc.start]:02x}); save it as UTF-8"
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ManifestError([Problem(file, message, line, column)]) from exc
    return parse_manifest(text.removeprefix("\ufeff"), file=file, path=Path(file))


def parse_manifest(text: str, *, file: str = "<manifest>", path: Path | None = None) -> Manifest:
    """Validate manifest text; ``file`` names it in problems, ``path`` (default: file) is kept."""
    try:
        doc = compose(text)
    except YamlSyntaxError as exc:
        line, column = (exc.pos.line, exc.pos.column) if exc.pos else (None, None)
        raise ManifestError([Problem(file, exc.message, line, column)]) from exc
    return _Validator(file, doc).run(path if path is not None else Path(file))


# --- the manifest --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Built:
    """One job as far as validation got; ``request`` is None when it has problems."""

    index: int
    line: int
    id: str | None  # the written id, when valid
    id_line: int
    request: dict[str, Any] | None


def _job_labels(data: Any) -> dict[int, str]:
    """How problems name each job: by its id when it has a valid one, else by number."""
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, list):
        return {}
    return {
        i: f"'{job['id']}'"
        for i, job in enumerate(jobs)
        if isinstance(job, dict) and "id" in job and id_problem(job["id"], None) is None
    }


class _Validator:
    """Walks one composed document, reporting every problem before giving up."""

    def __init__(self, file: str, doc: Document) -> None:
        self.doc = doc
        self.source = doc.source
        self.report = Report(file, doc.source, _job_labels(doc.data))
        for issue in doc.issues:
            self.report.error(issue.path, issue.message, pos=issue.pos)

    def run(self, path: Path) -> Manifest:
        top = self._top()
        settings = ManifestSettings()
        built: list[_Built] = []
        if top is not None:
            settings = self._settings(top.get("settings"))
            defaults = Defaults(top.get("defaults"), self.report)
            built = self._jobs(top, defaults)
            defaults.warn_unused()
            self._check_ids(built)
        if self.report.errors:
            raise ManifestError(_sorted(self.report.errors))
        jobs = tuple(self._job(b) for b in built)
        return Manifest(path, jobs, settings, tuple(_sorted(self.report.warnings)))

    def _job(self, built: _Built) -> Job:
        assert built.request is not None
        job_id = built.id or derived_id(built.request)
        # YAML anchors and defaults share lists between jobs; each job gets its own copy.
        return Job(job_id, copy.deepcopy(built.request), built.index, built.line)

    def _top(self) -> dict[Any, Any] | None:
        data = self.doc.data
        if self.doc.empty:
            self.report.error(
                (), "the manifest is empty; it needs 'version: 1' and a list of 'jobs'"
            )
            return None
        if not isinstance(data, dict):
            message = (
                f"expected a mapping with 'version' and 'jobs' at the top, got {describe(data)}"
            )
            self.report.error((), message)
            return None
        for key in data:
            if key not in TOP_KEYS:
                tail = "; expected " + ", ".join(repr(k) for k in TOP_KEYS)
                self.report.unknown((key,), "top-level key", TOP_KEYS, tail)
        self._version(data)
        return data

    def _version(self, data: dict[Any, Any]) -> None:
        if "version" not in data:
            self.report.error(
                ("version",), f"missing 'version: {VERSION}' at the top of the manifest"
            )
            return
        value = data["version"]
        if is_int(value) and value != VERSION:
            message = f"unsupported manifest version {value}; this veobatch reads version {VERSION}"
            self.report.error(("version",), message)
        elif not is_int(value):
            hint = unquote_hint("integer", value)
            self.report.error(
                ("version",), f"expected the integer {VERSION}, got {describe(value)}{hint}"
            )

    def _settings(self, raw: Any) -> ManifestSettings:
        if raw is None:
            return ManifestSettings()
        if not isinstance(raw, dict):
            self.report.error(
                ("settings",), f"expected a mapping of run settings, got {describe(raw)}"
            )
            return ManifestSettings()
        for key in raw:
            if key not in SETTING_KEYS:
                tail = "; expected " + ", ".join(repr(k) for k in SETTING_KEYS)
                self.report.unknown(("settings", key), "setting", SETTING_KEYS, tail)
        return ManifestSettings(
            concurrency=self._int_setting(raw, "concurrency"),
            job_timeout_s=self._timeout_setting(raw),
            download_concurrency=self._int_setting(raw, "download_concurrency"),
            resubmit_uncertain=self._bool_setting(raw, "resubmit_uncertain"),
            retry_failed=self._bool_setting(raw, "retry_failed"),
            notify_url=self._url_setting(raw, "notify_url"),
        )

    def _url_setting(self, raw: dict[Any, Any], name: str) -> str | None:
        value = raw.get(name)
        if value is None:
            return None
        if isinstance(value, str) and value.startswith(("https://", "http://")):
            return value
        self.report.error(("settings", name), f"expected an http(s) URL, got {describe(value)}")
        return None

    def _bool_setting(self, raw: dict[Any, Any], name: str) -> bool | None:
        if name not in raw:
            return None
        value = raw[name]
        if isinstance(value, bool):
            return value
        self.report.error(("settings", name), f"expected true or false, got {show(value)}")
        return None

    def _int_setting(self, raw: dict[Any, Any], name: str) -> int | None:
        if name not in raw:
            return None
        value, (low, high) = raw[name], SETTING_LIMITS[name]
        if is_int(value) and low <= value <= high:
            return int(value)
        got = show(value) if is_int(value) else describe(value) + unquote_hint("integer", value)
        self.report.error(
            ("settings", name), f"expected an integer from {low} to {high}, got {got}"
        )
        return None

    def _timeout_setting(self, raw: dict[Any, Any]) -> float | None:
        if "job_timeout_s" not in raw:
            return None
        value = raw["job_timeout_s"]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and math.isfinite(value) and value > 0:
            return float(value)
        got = show(value) if number else describe(value)
        message = f"expected a number of seconds greater than 0, got {got}"
        self.report.error(("settings", "job_timeout_s"), message)
        return None

    def _jobs(self, top: dict[Any, Any], defaults: Defaults) -> list[_Built]:
        if "jobs" not in top:
            self.report.error(("jobs",), "missing 'jobs': the list of videos to make")
            return []
        raw = top["jobs"]
        if not isinstance(raw, list) or not raw:
            got = "an empty list" if raw == [] else describe(raw)
            self.report.error(("jobs",), f"expected a non-empty list of jobs, got {got}")
            return []
        built = (self._one_job(i, item, defaults) for i, item in enumerate(raw))
        return [b for b in built if b is not None]

    def _one_job(self, index: int, item: Any, defaults: Defaults) -> _Built | None:
        path: KeyPath = ("jobs", index)
        line = self.source.item(path).line
        if not isinstance(item, dict):
            message = f"expected a job (a mapping of request fields), got {describe(item)}"
            self.report.error(path, message, at="item")
            return None
        job_id, id_ok = self._job_id(item, path)
        fields_ok = self._unknown_fields(item, path)
        model = self._job_model(item, path, defaults)
        request = self._request(item, path, model, defaults) if model is not None else None
        if not (id_ok and fields_ok and request is not None):
            request = None
        id_line = self.source.value((*path, "id")).line if job_id else line
        return _Built(index, line, job_id, id_line, request)

    def _job_id(self, item: dict[Any, Any], path: KeyPath) -> tuple[str | None, bool]:
        if "id" not in item:
            return None, True
        id_path = (*path, "id")
        problem = id_problem(item["id"], self.source.plain.get(id_path))
        if problem is not None:
            self.report.error(id_path, problem)
            return None, False
        return str(item["id"]), True

    def _unknown_fields(self, item: dict[Any, Any], path: KeyPath) -> bool:
        ok = True
        for key in item:
            if key not in JOB_KEYS:
                tail = "; a job takes 'id', 'model' and the API's request fields of its model"
                self.report.unknown((*path, key), "field", JOB_KEYS, tail)
                ok = False
        return ok

    def _job_model(
        self, item: dict[Any, Any], path: KeyPath, defaults: Defaults
    ) -> ModelSpec | None:
        if "model" not in item:
            if defaults.model is None and not defaults.model_broken:
                message = "missing 'model': set it in the job or in defaults"
                self.report.error((*path, "model"), message, pos=self.source.item(path))
            if defaults.model is not None:
                defaults.used.add("model")
            return defaults.model
        model_path = (*path, "model")
        problem = model_problem(item["model"])
        if problem is not None:
            self.report.error(model_path, problem)
            return None
        return MODELS[item["model"]]

    def _request(
        self, item: dict[Any, Any], path: KeyPath, model: ModelSpec, defaults: Defaults
    ) -> dict[str, Any] | None:
        """The exact POST body, or None when a field of it is wrong (each one reported)."""
        ok = True
        own: dict[str, Any] = {}
        for name, value in item.items():
            if name in ("id", "model") or name not in ALL_FIELDS:
                continue
            if name not in model.fields:
                self.report.error((*path, name), not_accepted(model, name), at="key")
                ok = False
                continue
            ok = self.report.field(model.fields[name], value, (*path, name)) and ok
            own[name] = value
        taken, defaults_ok = defaults.take(model, item)
        body: dict[str, Any] = {"model": model.name}
        body.update((k, v) for k, v in {**own, **taken}.items() if k == "prompt")
        body.update((k, v) for k, v in {**own, **taken}.items() if k != "prompt")
        for name in model.required:
            if name not in body:
                message = f"{model.name} requires {name!r}, which is missing"
                self.report.error((*path, name), message, pos=self.source.item(path))
                ok = False
        return body if ok and defaults_ok else None

    def _check_ids(self, built: list[_Built]) -> None:
        """Ids name output files, so they must differ even on case-insensitive file systems."""
        seen: dict[str, tuple[_Built, str]] = {}
        for b in built:
            job_id = b.id or (derived_id(b.request) if b.request is not None else None)
            if job_id is None:
                continue
            first = seen.setdefault(job_id.lower(), (b, job_id))
            if first[0] is not b:
                self._duplicate(first[0], first[1], b, job_id)

    def _duplicate(self, first: _Built, first_id: str, second: _Built, second_id: str) -> None:
        path: KeyPath = ("jobs", second.index)
        if first.id is None and second.id is None:
            message = (
                f"this job is identical to job #{first.index + 1} (line {first.line}): same model "
                "and request; remove one, or give them ids if you really want both"
            )
            self.report.error(path, message, at="item")
            return
        lines = f"lines {first.id_line} and {second.id_line}"
        if first_id == second_id:
            message = f"duplicate id {second_id!r} ({lines})"
        else:
            message = (
                f"id {second_id!r} clashes with {first_id!r} ({lines}): ids must differ "
                "in more than letter case, since they name files"
            )
        if second.id is None:
            self.report.error(
                path, message + "; this job's id is derived from its content", at="item"
            )
        else:
            self.report.error((*path, "id"), message)


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line or 0, p.column or 0))
