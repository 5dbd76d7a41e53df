"""Load a manifest: YAML in, a validated :class:`Manifest` out, or every problem at once.

It reads the manifest, the tables its ``jobs_from`` names and the local images its jobs name,
and nothing else; it never touches the network. Each job
is checked against its own model's fields from the catalogue, and each problem points at the
line to fix and says what was expected and what was found: a batch that fails on job 37 after
an hour of generating is exactly what this module exists to prevent.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalogue import ALL_FIELDS, MODELS, ModelSpec
from .errors import ManifestError, Problem
from .images import ImageStore, LocalImage, is_local_reference
from .jobs import (
    Job,
    Manifest,
    ManifestSettings,
    MatrixId,
    canonical_json,
    derived_id,
    fit_id,
    variant_seed,
)
from .manifest_checks import (
    At,
    Defaults,
    Report,
    describe,
    id_problem,
    int_in_range,
    is_int,
    likely_model,
    misread,
    model_problem,
    not_accepted,
    show,
    suggest,
    unquote_hint,
    variants_value,
)
from .notify import url_problem
from .tables import TABLE_SUFFIXES, read_table
from .yamlpos import Document, Pos, YamlSyntaxError, compose, editor_lines
from .yamlpos import Path as KeyPath

__all__ = ["load_manifest", "parse_manifest"]

VERSION = 1
TOP_KEYS = ("version", "settings", "defaults", "jobs", "jobs_from")
# Top-level keys the loader skips: a place for anchors (`x-base: &base {...}`) that jobs merge
# with `<<: *base`, as in Compose files.
EXTENSION_PREFIX = "x-"
MAX_MATRIX = 1000
EXPANDERS = ("id", "variants", "matrix")  # job keys that shape jobs rather than requests
SETTING_LIMITS: dict[str, tuple[int, int]] = {
    "concurrency": (1, 10_000),
    "download_concurrency": (1, 64),
}
BOOL_SETTINGS = ("resubmit_uncertain", "retry_failed")
SETTING_KEYS = (
    "concurrency",
    "job_timeout_s",
    "abandon_after_s",
    "download_concurrency",
    *BOOL_SETTINGS,
    "max_cost_usd",
    "prices",
    "notify_url",
)
JOB_KEYS = ("id", "model", "variants", "matrix", *sorted(ALL_FIELDS))
MATRIX_KEYS = ("model", *sorted(ALL_FIELDS))


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
        line, column, byte = _first_bad_byte(raw, exc)
        message = f"the manifest is not UTF-8 text (byte 0x{byte:02x}); save it as UTF-8"
        raise ManifestError([Problem(file, message, line, column)]) from exc
    return parse_manifest(text.removeprefix("\ufeff"), file=file, path=Path(file))


def is_extension(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(EXTENSION_PREFIX)


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: reading it will say so
        return path


def _first_bad_byte(raw: bytes, exc: UnicodeDecodeError) -> tuple[int, int, int]:
    """(line, column, byte) of the first byte that is not UTF-8, 1-based."""
    line_start = raw.rfind(b"\n", 0, exc.start) + 1
    column = len(raw[line_start : exc.start].decode("utf-8", "replace")) + 1
    return raw.count(b"\n", 0, exc.start) + 1, column, raw[exc.start]


def parse_manifest(text: str, *, file: str = "<manifest>", path: Path | None = None) -> Manifest:
    """Validate manifest text; ``file`` names it in problems, ``path`` (default: file) is kept."""
    try:
        doc = compose(text)
    except YamlSyntaxError as exc:
        line, column = (exc.pos.line, exc.pos.column) if exc.pos else (None, None)
        job, field = _unbuilt_at(exc) if exc.path else (None, _key_on_line(text, line))
        raise ManifestError([Problem(file, exc.message, line, column, job, field)]) from exc
    where = path if path is not None else Path(file)
    return _Validator(file, doc, where.parent).run(where)


_KEY_AT_START = re.compile(r"\s*(?:-\s+)*([A-Za-z_][\w.-]*)\s*:(?:\s|$)")


def _unbuilt_at(exc: YamlSyntaxError) -> tuple[str | None, str | None]:
    """The job and field of a document refused before it was built (an alias past the
    budget): the job by its id when it has a usable one, else by number."""
    path = exc.path
    if len(path) < 2 or path[0] != "jobs" or not isinstance(path[1], int):
        return None, ".".join(str(p) for p in path)
    written = exc.ids.get(path[:2])
    ok = written is not None and id_problem(written, None) is None
    job = f"'{written}'" if ok else f"#{path[1] + 1}"
    return job, ".".join(str(p) for p in path[2:]) or None


def _key_on_line(text: str, line: int | None) -> str | None:
    """The key a syntax error's line starts with, so even bad YAML names a field."""
    if line is None:
        return None
    lines = editor_lines(text)
    match = _KEY_AT_START.match(lines[line - 1]) if 0 < line <= len(lines) else None
    return match[1] if match else None


# --- the manifest --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Origin:
    """One request as written (a job, or a combination of its matrix), shared by its takes."""

    variants: int
    seed_written: bool  # the request has a seed, written in the job, its matrix or defaults
    reseeded: bool  # variants gave each take its own seed


@dataclass(frozen=True)
class _Built:
    """One valid job, expanded from a written one (several for a matrix or variants)."""

    index: int  # of the written job in its list (the manifest's jobs or a table's rows)
    line: int
    id: str  # the final id: written, suffixed, or derived from the request
    written_id: str | None
    id_pos: Pos  # where its id is written, or the job itself for a derived or shared id
    request: dict[str, Any]
    identity: dict[str, Any]
    report: Report
    # Only its id is known (the job has an error): still checked against the others' ids, so
    # a duplicate is reported along with the job's other problems.
    origin: _Origin | None = None  # None for a placeholder
    seeded_take: int = 0  # take n of variants given a seed made from the id; 0: not
    matrix_id: MatrixId | None = None  # how a matrix combination's written id is made

    @property
    def placeholder(self) -> bool:
        return self.origin is None


def _job_labels(data: Any) -> dict[int, str]:
    """How problems name each job: by its id when it has a valid one, else by number."""
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, list):
        return {}
    return _row_labels(jobs, by_number=False)


def _row_labels(rows: list[Any], *, by_number: bool = True) -> dict[int, str]:
    labels = {i: f"row {i + 1}" for i in range(len(rows))} if by_number else {}
    for i, job in enumerate(rows):
        if isinstance(job, dict) and "id" in job and id_problem(job["id"], None) is None:
            labels[i] = f"'{job['id']}'"
    return labels


def slug(value: Any, *, hashed: bool = False) -> str:
    """A matrix value as an id suffix: readable, file-safe, and stable across runs."""
    text = _written(value).replace(":", "x").replace("/", "-").replace(" ", "_")
    safe = re.sub(r"[^A-Za-z0-9._-]", "", text).strip("._-")[:24]
    if safe == text and not hashed:
        return safe
    digest = hashlib.sha256(canonical_json(value).encode()).hexdigest()[:6]
    return f"{safe}-{digest}" if safe else digest


def axis_slugs(values: list[Any]) -> list[str]:
    """Suffixes for one matrix field's values, distinct even on a case-blind file system.

    ``16:9`` stays ``16x9``; only when two values would give the same suffix (``a:b`` and
    ``axb``, ``Dog runs`` and ``dog runs``) does each one that had to be altered get a hash,
    and if that is not enough, each of them; ids that never clashed are unchanged.
    """
    plain = [slug(v) for v in values]
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(plain):
        groups.setdefault(s.lower(), []).append(i)
    out = list(plain)
    for members in groups.values():
        if len({canonical_json(values[i]) for i in members}) < 2:
            continue  # one value written twice: reported as a duplicate id
        altered = [i for i in members if plain[i] != _written(values[i])]
        if len(members) - len(altered) > 1:  # unaltered yet alike: "Dog" and "dog", 8 and "8"
            altered = members
        for i in altered:
            out[i] = slug(values[i], hashed=True)
    return out


def _written(value: Any) -> str:
    return show(value) if isinstance(value, bool) else str(value)


def variant_ids(base_id: str, count: int) -> list[str]:
    """The final ids of a job's takes; matrix and take suffixes may not exceed the id limit."""
    if count == 1:
        return [fit_id(base_id)]
    return [fit_id(f"{base_id}-{n}") for n in range(1, count + 1)]


def expand_variants(
    base_id: str, body: dict[str, Any], identity: dict[str, Any], model: ModelSpec, count: int
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """N takes of one request: ids ``<id>-1`` … ``<id>-N``, each its own seed where possible.

    A written seed is the first take's, sent unchanged; take n sends it plus n - 1. The
    published schemas give ``seed`` as a bare integer with no minimum or maximum, so nothing
    wraps (a negative seed counts up through zero). Without a written seed each take gets a
    seed derived from the id and take number. Models without a seed field get N identical
    requests, which the API still renders as different takes.
    """
    if count == 1:  # one take: the job's own request, under its (possibly shortened) id
        return [(fit_id(base_id), body, identity)]
    out = []
    for n, one_id in enumerate(variant_ids(base_id, count), start=1):
        one_body, one_identity = dict(body), dict(identity)
        if "seed" in model.fields:
            written = body.get("seed")
            if isinstance(written, int):
                seed = written + n - 1
            else:
                seed = variant_seed(base_id, n)
            one_body["seed"] = one_identity["seed"] = seed
        out.append((one_id, one_body, one_identity))
    return out


def _own_copy(value: Any) -> Any:
    """A copy of the containers a YAML document built; its scalars are immutable and shared.

    ``copy.deepcopy`` would do the same at several times the cost, and a big manifest pays it
    for every job.
    """
    if isinstance(value, dict):
        return {k: _own_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_own_copy(v) for v in value]
    if isinstance(value, set):
        return set(value)  # YAML set members are scalars
    if isinstance(value, tuple):  # !!pairs and !!omap
        return tuple(_own_copy(v) for v in value)
    return value


def _covering(
    axes: list[list[tuple[str, Any, KeyPath, str]]],
) -> list[dict[str, tuple[Any, KeyPath, str]]]:
    """A few combinations that hold every value of every axis: enough to check each value
    when the matrix itself is refused."""
    longest = max((len(axis) for axis in axes), default=0)
    covering = [_combo(axis[min(i, len(axis) - 1)] for axis in axes) for i in range(longest)]
    return covering or [{}]


def _matrix_id(
    job_id: str | None, combo: dict[str, tuple[Any, KeyPath, str]], take: int
) -> MatrixId | None:
    """How the id of take ``take`` (0: the only one) of a combination is made, when the
    matrix's fields in another order would make another id of it: a written id, two fields."""
    if job_id is None or len(combo) < 2:
        return None
    return MatrixId(job_id, tuple(suffix for _, _, suffix in combo.values()), take)


def _combo(cells: Iterable[tuple[str, Any, KeyPath, str]]) -> dict[str, tuple[Any, KeyPath, str]]:
    """One combination of a matrix: each field's value, where it was written, its id suffix."""
    return {name: (value, where, suffix) for name, value, where, suffix in cells}


def _matches(combo: dict[str, tuple[Any, KeyPath, str]], exclude: dict[Any, Any]) -> bool:
    return all(name in combo and _same(combo[name][0], value) for name, value in exclude.items())


def _same(a: Any, b: Any) -> bool:
    """Equal and of one type: ``1`` does not leave out ``true``, nor ``"4"`` leave out 4."""
    return type(a) is type(b) and a == b


class _Validator:
    """Walks one composed document (and the tables it names), reporting every problem."""

    def __init__(self, file: str, doc: Document, base_dir: Path) -> None:
        self.doc = doc
        self.file = file
        self.base_dir = base_dir
        self.images = ImageStore(base_dir)
        self.report = Report(file, doc.source, _job_labels(doc.data), images=self.images)
        self.tables: list[Report] = []
        self._unknown_columns: set[tuple[str, Any]] = set()  # (table file, header) told
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
        jobs = [(b, self._job(b)) for b in built if not b.placeholder]
        self._check_requests(jobs)
        reports = [self.report, *self.tables]
        errors = [p for r in reports for p in r.errors]
        if errors:
            raise ManifestError(self._sorted(errors))
        warnings = [p for r in reports for p in r.warnings]
        return Manifest(path, tuple(j for _, j in jobs), settings, tuple(self._sorted(warnings)))

    def _sorted(self, problems: list[Problem]) -> list[Problem]:
        rank = {r.file: i for i, r in enumerate([self.report, *self.tables])}
        return sorted(problems, key=lambda p: (rank.get(p.file, 0), p.line or 0, p.column or 0))

    def _job(self, built: _Built) -> Job:
        # YAML anchors and defaults share lists between jobs; each job gets its own copy
        # (its scalars and local images are shared, not copied).
        identity = built.identity if built.identity != built.request else None
        source = None if built.report is self.report else built.report.file
        return Job(
            built.id,
            _own_copy(built.request),
            built.index,
            built.line,
            identity=_own_copy(identity),
            source=source,
            derived=built.written_id is None,
            seeded_take=built.seeded_take,
            matrix_id=built.matrix_id,
        )

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
            if key not in TOP_KEYS and not is_extension(key):
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
        plain = self.doc.source.plain.get(("version",))
        got = misread(value, plain)
        if got is not None:
            message = f"expected the integer {VERSION}, got {got}"
            self.report.error(("version",), message)
        elif is_int(value) and value != VERSION:
            message = f"unsupported manifest version {value}; this veobatch reads version {VERSION}"
            self.report.error(("version",), message)
        elif not is_int(value):
            hint = unquote_hint("integer", value, plain)
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
            job_timeout_s=self._timeout_setting(raw, "job_timeout_s"),
            abandon_after_s=self._timeout_setting(raw, "abandon_after_s"),
            download_concurrency=self._int_setting(raw, "download_concurrency"),
            resubmit_uncertain=self._bool_setting(raw, "resubmit_uncertain"),
            retry_failed=self._bool_setting(raw, "retry_failed"),
            max_cost_usd=self._cost_setting(raw),
            prices=self._prices(raw.get("prices")),
            notify_url=self._url_setting(raw, "notify_url"),
        )

    def _url_setting(self, raw: dict[Any, Any], name: str) -> str | None:
        value = raw.get(name)
        if value is None:
            return None
        # A webhook URL's path is often a credential: problems name only its scheme and host.
        problem = url_problem(value) if isinstance(value, str) else None
        if isinstance(value, str) and problem is None:
            return value
        problem = problem or f"expected an http(s) URL, got {describe(value)}"
        self.report.error(("settings", name), problem)
        return None

    def _cost_setting(self, raw: dict[Any, Any]) -> float | None:
        if "max_cost_usd" not in raw:
            return None
        expected = "an amount in US dollars, 0 or more (e.g. 250)"
        return self._amount(("settings", "max_cost_usd"), raw["max_cost_usd"], expected)

    def _amount(
        self, at: KeyPath, value: Any, expected: str, *, above_zero: bool = False
    ) -> float | None:
        """A finite number, at least 0 (above 0 with ``above_zero``), or a reported problem."""
        number = isinstance(value, int | float) and not isinstance(value, bool)
        plain = self.report.source.plain.get(at)
        misreading = misread(value, plain)
        in_range = number and math.isfinite(value) and (value > 0 if above_zero else value >= 0)
        if in_range and misreading is None:
            return float(value)
        got = misreading or (show(value) if number else describe(value))
        self.report.error(at, f"expected {expected}, got {got}")
        return None

    def _prices(self, raw: Any) -> dict[str, float]:
        """Price overrides: model -> USD per second of video (the API publishes none)."""
        if raw is None:
            return {}
        at: KeyPath = ("settings", "prices")
        if not isinstance(raw, dict):
            message = f"expected a mapping of model name to USD per second, got {describe(raw)}"
            self.report.error(at, message)
            return {}
        prices: dict[str, float] = {}
        for model, value in raw.items():
            problem = model_problem(model)
            if problem is not None:
                self.report.error((*at, model), problem, at="key")
                continue
            expected = "a price in USD per second of video (e.g. 0.40)"
            price = self._amount((*at, model), value, expected)
            if price is not None:
                prices[model] = price
        return prices

    def _bool_setting(self, raw: dict[Any, Any], name: str) -> bool | None:
        if name not in raw:
            return None
        value, at = raw[name], ("settings", name)
        plain = self.report.source.plain.get(at)
        if isinstance(value, bool) and (plain is None or plain.lower() in ("true", "false")):
            return value
        if isinstance(value, bool):  # yes, on, y...: what a job field refuses, a setting does
            word = show(value)
            got = f"{plain} (YAML 1.1 reads it as {word}; write {word})"
        else:
            got = describe(value)
        self.report.error(at, f"expected true or false, got {got}")
        return None

    def _int_setting(self, raw: dict[Any, Any], name: str) -> int | None:
        if name not in raw:
            return None
        low, high = SETTING_LIMITS[name]
        expected = f"an integer from {low} to {high}"
        return int_in_range(self.report, raw[name], ("settings", name), low, high, expected)

    def _timeout_setting(self, raw: dict[Any, Any], name: str) -> float | None:
        if name not in raw:
            return None
        expected = "a number of seconds greater than 0"
        return self._amount(("settings", name), raw[name], expected, above_zero=True)

    def _jobs(self, top: dict[Any, Any], defaults: Defaults) -> list[_Built]:
        built: list[_Built] = []
        raw = top.get("jobs")
        has_tables = top.get("jobs_from") is not None
        if "jobs" not in top and not has_tables:
            self.report.error(
                ("jobs",), "missing 'jobs': the list of videos to make (or 'jobs_from: a.csv')"
            )
        elif "jobs" in top and not (isinstance(raw, list) and (raw or has_tables)):
            got = "an empty list" if raw == [] else describe(raw)
            self.report.error(("jobs",), f"expected a non-empty list of jobs, got {got}")
        elif isinstance(raw, list):
            for i, item in enumerate(raw):
                built.extend(self._one_job(self.report, i, item, defaults))
        if has_tables:
            for report, rows in self._tables(top["jobs_from"]):
                for i, item in enumerate(rows):
                    built.extend(self._one_job(report, i, item, defaults))
            if top["jobs_from"] == [] and not raw:
                inline = "'jobs' is empty" if "jobs" in top else "there is no 'jobs' list"
                message = (
                    f"the manifest has no jobs: 'jobs_from' names no file and {inline}; add "
                    "jobs, or name a .csv or .jsonl file"
                )
                self.report.error(("jobs_from",), message)
        return built

    def _tables(self, raw: Any) -> list[tuple[Report, list[dict[str, Any]]]]:
        """Each `jobs_from` file read into rows, with a report that points into that file."""
        names = raw if isinstance(raw, list) else [raw]
        out: list[tuple[Report, list[dict[str, Any]]]] = []
        listed: dict[Path, str] = {}
        for i, name in enumerate(names):
            at: KeyPath = ("jobs_from", i) if isinstance(raw, list) else ("jobs_from",)
            if not isinstance(name, str) or not name.strip():
                expected = "a .csv or .jsonl file name (or a list of them)"
                self.report.error(at, f"expected {expected}, got {describe(name)}")
                continue
            if not name.lower().endswith(TABLE_SUFFIXES):
                message = f"{name!r} is neither a .csv nor a .jsonl file; jobs_from reads those"
                self.report.error(at, message)
                continue
            path = self.base_dir / name
            shown = str(Path(self.file).parent / name)
            same = _resolved(path)
            if same in listed:
                message = f"{name!r} is the file already listed as {listed[same]!r}: list it once"
                self.report.error(at, message)
                continue
            listed[same] = name
            try:
                data = path.read_bytes()
            except OSError as exc:
                reason = exc.strerror or str(exc)
                where = f" (looked for {path}; paths are relative to the manifest's folder)"
                self.report.error(at, f"cannot read {name!r}: {reason}{where}")
                continue
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                line, column, byte = _first_bad_byte(data, exc)
                message = (
                    f"{name!r} is not UTF-8 text (byte 0x{byte:02x} at line {line}, column "
                    f"{column}); save it as UTF-8"
                )
                self.report.error(at, message)
                continue
            table = read_table(text, shown)
            report = Report(shown, table.source, _row_labels(table.rows), images=self.images)
            report.add_errors(table.problems)
            for issue in table.issues:
                report.error(issue.path, issue.message, pos=issue.pos)
            self.tables.append(report)
            if not table.rows and not table.problems:
                self.report.error(at, f"{name!r} has no rows: each row of it is one job")
            out.append((report, table.rows))
        return out

    def _one_job(self, report: Report, index: int, item: Any, defaults: Defaults) -> list[_Built]:
        """One written job: a mapping, expanded by its matrix and variants into jobs."""
        path: KeyPath = ("jobs", index)
        line = report.source.item(path).line
        if not isinstance(item, dict):
            message = f"expected a job (a mapping of request fields), got {describe(item)}"
            report.error(path, message, at="item")
            return []
        job_id, id_ok = self._job_id(report, item, path)
        fields_ok = self._unknown_fields(report, item, path)
        variants = self._variants(report, item, path, defaults)
        combos = self._matrix(report, item, path)
        id_pos = self._id_pos(report, path) if job_id else report.source.item(path)
        ok = id_ok and fields_ok and combos is not None
        built: list[_Built] = []
        for combo in combos or [{}]:
            where = {name: (*path, name) for name in item}
            fields = {k: v for k, v in item.items() if k not in EXPANDERS}
            for name, (value, at, _) in combo.items():
                fields[name], where[name] = value, at
            model = self._job_model(report, fields, path, where, defaults)
            request = None
            if model is not None:
                request = self._request(report, fields, path, where, model, defaults)
            if model is None or request is None or variants is None or not ok:
                # What is wrong is reported; nothing to build, but a written id still counts.
                if job_id is not None and combos is not None and variants is not None:
                    ids = variant_ids(self._combo_id(job_id, combo, {}), variants)
                    built.extend(
                        _Built(index, line, i, job_id, id_pos, {}, {}, report) for i in ids
                    )
                continue
            body, identity = request
            base = self._combo_id(job_id, combo, identity)
            origin = _Origin(variants, "seed" in body, variants > 1 and "seed" in model.fields)
            takes = expand_variants(base, body, identity, model, variants)
            seeded = origin.reseeded and not origin.seed_written
            built.extend(
                _Built(
                    index,
                    line,
                    i,
                    job_id,
                    id_pos,
                    b,
                    k,
                    report,
                    origin,
                    n * seeded,
                    _matrix_id(job_id, combo, n * (len(takes) > 1)),
                )
                for n, (i, b, k) in enumerate(takes, start=1)
            )
        return built

    @staticmethod
    def _id_pos(report: Report, path: KeyPath) -> Pos:
        """Where a job's id is written; the job's own dash when the id was written before the
        job itself (an alias ``- *job`` or a merged ``<<: *base``), not the shared text."""
        written, item = report.source.value((*path, "id")), report.source.item(path)
        return written if written >= item else item

    def _combo_id(
        self,
        job_id: str | None,
        combo: dict[str, tuple[Any, KeyPath, str]],
        identity: dict[str, Any],
    ) -> str:
        if job_id is None:
            return derived_id(identity)
        if not combo:
            return job_id
        return job_id + "-" + "-".join(suffix for _, _, suffix in combo.values())

    def _variants(
        self, report: Report, item: dict[Any, Any], path: KeyPath, defaults: Defaults
    ) -> int | None:
        if "variants" not in item:
            return defaults.variants or 1  # an invalid default is reported once, there
        return variants_value(report, item["variants"], (*path, "variants"))

    def _matrix(
        self, report: Report, item: dict[Any, Any], path: KeyPath
    ) -> list[dict[str, tuple[Any, KeyPath, str]]] | None:
        """Every combination of the matrix's values, each value with where it was written."""
        if "matrix" not in item:
            return [{}]
        at: KeyPath = (*path, "matrix")
        raw = item["matrix"]
        if not isinstance(raw, dict) or not raw:
            got = "an empty mapping" if raw == {} else describe(raw)
            message = f"expected a mapping of field names to lists of values, got {got}"
            report.error(at, message)
            return None
        axes: list[list[tuple[str, Any, KeyPath, str]]] = []
        axis_values: dict[str, list[Any]] = {}
        for name, values in raw.items():
            if name == "exclude":
                continue
            if name not in MATRIX_KEYS:
                tail = "; a matrix varies 'model' or the API's request fields"
                report.unknown((*at, name), "matrix field", MATRIX_KEYS, tail)
                continue
            if name in item:
                message = f"{name!r} is set both in the job and in its matrix; keep one"
                report.error((*at, name), message, at="key")
                continue
            if not isinstance(values, list) or not values:
                got = "an empty list" if values == [] else describe(values)
                report.error((*at, name), f"expected a non-empty list of values, got {got}")
                continue
            suffixes = axis_slugs(values)
            axes.append([(name, v, (*at, name, k), suffixes[k]) for k, v in enumerate(values)])
            axis_values[name] = values
        excluded = self._exclusions(report, raw.get("exclude"), at, axis_values)
        count = math.prod(len(axis) for axis in axes)
        # No exclude list brings it back under (and a huge one is not worth building).
        if count > MAX_MATRIX and (not excluded or count > 100 * MAX_MATRIX):
            message = f"the matrix makes {count} jobs; at most {MAX_MATRIX} per job entry"
            report.error(at, message, at="key")
            return _covering(axes)
        combos = [_combo(cells) for cells in itertools.product(*axes)]
        kept = [c for c in combos if not any(_matches(c, e) for e in excluded or ())]
        if not kept:
            report.error(at, "the matrix's exclude list removes every combination", at="key")
        elif len(kept) > MAX_MATRIX:
            message = f"the matrix makes {len(kept)} jobs; at most {MAX_MATRIX} per job entry"
            report.error(at, message, at="key")
        else:
            return kept
        # Its values are still checked (every problem at once); the error already reported
        # keeps the manifest from being used.
        return _covering(axes)

    def _exclusions(
        self, report: Report, raw: Any, at: KeyPath, axes: dict[str, list[Any]]
    ) -> list[dict[Any, Any]] | None:
        """Each entry leaves out at least one combination, or it is a mistake that would be
        paid for; every valid entry does, since the matrix has every combination."""
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(isinstance(e, dict) and e for e in raw):
            message = f"expected a list of field/value mappings to leave out, got {describe(raw)}"
            report.error((*at, "exclude"), message)
            return None
        ok = True
        for i, entry in enumerate(raw):
            for name, value in entry.items():
                where: KeyPath = (*at, "exclude", i, name)
                plain = report.source.plain.get(where)
                if name not in axes:
                    message = f"{name!r} is not one of this matrix's fields" + suggest(
                        str(name), sorted(axes)
                    )
                    report.error(where, message, at="key")
                    ok = False
                elif is_int(value) or isinstance(value, float):  # 010 would leave out 8
                    got = misread(value, plain)
                    if got is not None:
                        report.error(where, f"expected a plain number, got {got}")
                        ok = False
                        continue
                if name in axes and not any(_same(v, value) for v in axes[name]):
                    listed = ", ".join(show(v) for v in axes[name])
                    message = (
                        f"{show(value)} ({type(value).__name__}) is not one of the matrix's "
                        f"{name!r} values ({listed}), so this entry would leave out nothing"
                    )
                    report.error(where, message)
                    ok = False
        return list(raw) if ok else None

    def _job_id(
        self, report: Report, item: dict[Any, Any], path: KeyPath
    ) -> tuple[str | None, bool]:
        if "id" not in item:
            return None, True
        id_path = (*path, "id")
        if id_path in report.source.bad:  # already reported (an unreadable escape, a bad tag)
            return None, False
        problem = id_problem(item["id"], report.source.plain.get(id_path))
        if problem is not None:
            report.error(id_path, problem)
            return None, False
        return str(item["id"]), True

    def _unknown_fields(self, report: Report, item: dict[Any, Any], path: KeyPath) -> bool:
        ok = True
        for key in item:
            if key not in JOB_KEYS:
                ok = False
                if report is not self.report:  # a table's header: said once, not per row
                    if (report.file, key) in self._unknown_columns:
                        continue
                    self._unknown_columns.add((report.file, key))
                tail = (
                    "; a job takes 'id', 'model' and the API's request fields of its model "
                    "(and 'variants' or 'matrix')"
                )
                report.unknown((*path, key), "field", JOB_KEYS, tail)
        return ok

    def _job_model(
        self,
        report: Report,
        item: dict[Any, Any],
        path: KeyPath,
        where: dict[Any, KeyPath],
        defaults: Defaults,
    ) -> ModelSpec | None:
        if "model" not in item:
            if defaults.model is None and not defaults.model_broken:
                message = "missing 'model': set it in the job or in defaults"
                report.error((*path, "model"), message, pos=report.source.item(path))
            if defaults.model is not None:
                defaults.used.add("model")
            return defaults.model
        problem = model_problem(item["model"])
        if problem is not None:
            report.error(where["model"], problem)
            # The job's other fields are still checked, as for the model it most likely
            # means: a table of 20,000 rows missing 'google/' should not take two rounds.
            likely = likely_model(item["model"])
            return MODELS[likely] if likely is not None else None
        return MODELS[item["model"]]

    def _request(
        self,
        report: Report,
        item: dict[Any, Any],
        path: KeyPath,
        where: dict[Any, KeyPath],
        model: ModelSpec,
        defaults: Defaults,
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(the exact POST body, its identity), or None when a field is wrong (each reported)."""
        ok = True
        own: dict[str, Any] = {}
        # A table's keys are its header, shared by every row: a row's problem is at its cell.
        at: At = "key" if report is self.report else "value"
        for name, value in item.items():
            if name == "model" or name not in ALL_FIELDS:
                continue
            if name not in model.fields:
                report.error(where[name], not_accepted(model, name), at=at)
                ok = False
                continue
            ok = report.field(model.fields[name], value, where[name]) and ok
            own[name] = value
        taken, defaults_ok = defaults.take(model, item)
        merged = {**own, **taken}
        fields: dict[str, Any] = {"model": model.name}
        fields.update((k, v) for k, v in merged.items() if k == "prompt")
        fields.update((k, v) for k, v in merged.items() if k != "prompt")
        for name in model.required:
            if name not in fields:
                message = f"{model.name} requires {name!r}, which is missing"
                report.error((*path, name), message, pos=report.source.item(path))
                ok = False
        if not (ok and defaults_ok):
            return None
        return self._inline_images(model, fields)

    def _inline_images(
        self, model: ModelSpec, fields: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Local files become :class:`LocalImage` values in the body (made data: URIs when the
        create is sent) and content hashes in the identity."""
        body, identity = dict(fields), dict(fields)
        for name, value in fields.items():
            kind = model.fields[name].type if name in model.fields else None
            if kind == "image" and is_local_reference(value):
                body[name], identity[name] = self._local(value)
            elif kind == "image_list" and any(is_local_reference(v) for v in value):
                pairs = [self._local(v) if is_local_reference(v) else (v, v) for v in value]
                body[name] = [b for b, _ in pairs]
                identity[name] = [i for _, i in pairs]
        return body, identity

    def _local(self, reference: str) -> tuple[LocalImage | str, str]:
        image = self.images.check(reference).image
        assert image is not None  # checked by Report.field before any job is built
        return image.inline or image, image.identity

    def _check_ids(self, built: list[_Built]) -> None:
        """Ids name output files, so they must differ even on case-insensitive file systems."""
        seen: dict[str, _Built] = {}
        for b in built:
            first = seen.setdefault(b.id.lower(), b)
            if first is not b:
                self._duplicate(first, b)

    def _check_requests(self, jobs: list[tuple[_Built, Job]]) -> None:
        """Variants and matrices must not make one request twice from two written requests.

        Two takes would then send the same body: one video made, and paid for, twice. Takes of
        one request may repeat it (models without a seed); two jobs given their own ids may ask
        for the same request on purpose; a shared id is reported by :meth:`_check_ids`.
        """
        seen: dict[str, _Built] = {}
        for b, job in jobs:
            first = seen.setdefault(job.vkey, b)
            one, two = first.origin, b.origin
            if one is two or one is None or two is None or first.id.lower() == b.id.lower():
                continue
            if one.reseeded or two.reseeded:
                self._same_request(first, b, one, two)
            elif first.written_id is None and b.written_id is None:
                self._identical(first, b)
            elif "seed" in b.request:  # asked for on purpose, but what for? Said, not refused
                message = (
                    f"the same request and seed as {self._written_at(first, b)}: the API will"
                    " most likely make the same video for both, and each is paid for"
                )
                b.report.warn(("jobs", b.index), message, at="item")

    def _identical(self, first: _Built, second: _Built) -> None:
        message = (
            f"this job is identical to {self._written_at(first, second)}: same model and "
            "request; remove one, or give them ids if you really want both"
        )
        second.report.error(("jobs", second.index), message, at="item")

    def _same_request(self, first: _Built, second: _Built, one: _Origin, two: _Origin) -> None:
        if one.seed_written and two.seed_written:
            apart = max(one.variants, two.variants)
            fix = f"write seeds at least {apart} apart (take n sends the job's seed plus n - 1)"
        else:
            fix = "give one of them another seed, or remove one"
        if first.report is second.report and first.index == second.index:
            which = f"{first.id!r} and {second.id!r}, both made by this job, are the same request"
        else:
            which = (
                f"{second.id!r} is the same request as {first.id!r} of "
                f"{self._written_at(first, second)}"
            )
        message = (
            f"{which}: same model, fields and seed {second.request.get('seed')}, so one video "
            f"would be made and paid for twice; {fix}"
        )
        second.report.error(("jobs", second.index), message, at="item")

    @staticmethod
    def _written_at(first: _Built, second: _Built) -> str:
        """Where ``first`` was written, as seen from ``second``'s file."""
        if first.report is not second.report:
            return f"the job at {first.report.file}:{first.line}"
        label = first.report.labels.get(first.index, f"#{first.index + 1}")
        return f"job {label} (line {first.line})"

    def _duplicate(self, first: _Built, second: _Built) -> None:
        path: KeyPath = ("jobs", second.index)
        report = second.report
        if first.report is second.report and first.index == second.index:
            message = (
                f"this job's matrix or variants make the id {second.id!r} twice; give the "
                "values distinct spellings"
            )
            report.error(path, message, at="item")
            return
        same_file = first.report is second.report
        if first.written_id is None and second.written_id is None:
            self._identical(first, second)
            return
        lines = f"lines {first.id_pos.line} and {second.id_pos.line}"
        if not same_file:
            lines = (
                f"{first.report.file}:{first.id_pos.line} and "
                f"{second.report.file}:{second.id_pos.line}"
            )
        made = next((b for b in (first, second) if b.written_id not in (None, b.id)), None)
        if made is not None:  # one was made by a job's variants or matrix, from another id
            lines += f"; {made.id!r} is made from the id {made.written_id!r} by its variants"
            lines += " or matrix"
        if first.id == second.id:
            message = f"duplicate id {second.id!r} ({lines})"
        else:
            message = (
                f"id {second.id!r} clashes with {first.id!r} ({lines}): ids must differ "
                "in more than letter case, since they name files"
            )
        if second.written_id is None:
            report.error(path, message + "; this job's id is derived from its content", at="item")
        else:
            report.error((*path, "id"), message, pos=second.id_pos)
