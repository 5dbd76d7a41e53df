"""What a validated manifest becomes: plain frozen values the pipeline consumes.

Kept apart from the loader so the scheduler, ledger and CLI depend on these types only,
never on YAML or pydantic.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalogue import CASE_INSENSITIVE, get_model
from .errors import Problem
from .jobview import requested_duration_s

MODEL_PREFIX = "google/veo-3.1-"  # dropped from a derived id


def canonical_json(value: Any) -> str:
    """One spelling per value, so equal requests hash equally across runs and machines."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(request: Mapping[str, Any]) -> str:
    """The identity of a request: sha256 of its canonical JSON (model included)."""
    digest = hashlib.sha256()
    for part in _canonical_parts(dict(request)):
        digest.update(part)
    return digest.hexdigest()


def video_key(request: Mapping[str, Any], key: str | None = None) -> str:
    """The identity of the video a request asks for: its key once the fields that say what the
    model does anyway (its defaults written out) are dropped and the fields the API reads in
    any case (provider) are lowercased. Two requests the API would make differently never
    share it; nothing else is set aside. ``key``: the request's own key, when known."""
    same = _same_video(request)
    if same is None:
        return key if key is not None else request_key(request)
    return request_key(same)


def derived_id(request: Mapping[str, Any]) -> str:
    """Stable across runs and machines: the same video asked for always gets the same id,
    however it is written (a default written out, a provider's case: :func:`video_key`)."""
    short = str(request["model"]).removeprefix(MODEL_PREFIX)
    return f"{short}-{video_key(request)[:10]}"


# A made id names files such as <id>.mp4.part.meta and <id>@<sha8>-2.mp4: past this many
# characters it would not fit a file name (255 bytes). Ids up to here ran before, and their
# ledgers know them by these ids, so they stay as they are.
MADE_ID_MAX_LEN = 236
ID_HASH_CHARS = 10  # of the hash a longer one ends with, after a '-'


def fit_id(text: str) -> str:
    """A made id within MADE_ID_MAX_LEN: a longer one keeps its start and gains a hash of
    the whole."""
    if len(text) <= MADE_ID_MAX_LEN:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:ID_HASH_CHARS]
    return f"{text[: MADE_ID_MAX_LEN - ID_HASH_CHARS - 1]}-{digest}"


def variant_seed(base_id: str, n: int) -> int:
    """Stable per (job, take): a rerun asks for the same takes, a new take for a new number."""
    digest = hashlib.sha256(f"{base_id}#{n}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _same_video(request: Mapping[str, Any]) -> dict[str, Any] | None:
    """``request`` written as :func:`video_key` hashes it; None when that is as it is."""
    spec = get_model(str(request.get("model")))
    if spec is None:
        return None
    out: dict[str, Any] | None = None
    for name, spec_field in spec.fields.items():
        if name not in request:
            continue
        value = request[name]
        if isinstance(value, str) and name in CASE_INSENSITIVE and value != value.lower():
            out = dict(request) if out is None else out
            value = out[name] = value.lower()
        if spec_field.default is not None and _is_default(value, spec_field.default):
            out = dict(request) if out is None else out
            del out[name]
    return out


def _is_default(value: Any, default: Any) -> bool:
    """Exactly the default: 8 is, 8.0 or "8" is not (the case of provider is lowered first)."""
    return type(value) is type(default) and value == default


# A data: URI of a few MB, shared by thousands of jobs through defaults, was JSON-encoded
# again for each job's key (8 ms each); its encoding is kept instead. The bytes hashed are
# exactly canonical_json's, so keys already in ledgers stay the same.
_BIG = 1 << 16
_encoded_big: dict[str, bytes] = {}


def _canonical_parts(value: Any) -> list[bytes]:
    if not _has_big_string(value):
        return [canonical_json(value).encode("utf-8")]
    parts: list[bytes] = []
    _encode_into(value, parts)
    return parts


def _has_big_string(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) > _BIG
    if isinstance(value, dict):
        return any(_has_big_string(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_big_string(v) for v in value)
    return False


def _encode_into(value: Any, parts: list[bytes]) -> None:
    """canonical_json's bytes in pieces, each big string's piece encoded once."""
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        parts.append(b"{")
        for i, key in enumerate(sorted(value)):
            parts.append((b"," if i else b"") + canonical_json(key).encode("utf-8") + b":")
            _encode_into(value[key], parts)
        parts.append(b"}")
    elif isinstance(value, list | tuple):
        parts.append(b"[")
        for i, item in enumerate(value):
            if i:
                parts.append(b",")
            _encode_into(item, parts)
        parts.append(b"]")
    elif isinstance(value, str) and len(value) > _BIG:
        encoded = _encoded_big.get(value)
        if encoded is None:
            if len(_encoded_big) >= 16:
                _encoded_big.clear()
            encoded = _encoded_big[value] = canonical_json(value).encode("utf-8")
        parts.append(encoded)
    else:
        parts.append(canonical_json(value).encode("utf-8"))


@dataclass(frozen=True)
class MatrixId:
    """How a matrix combination's written id is made: ``<id>-<suffix>-...[-<take>]``, one
    suffix per field in the order the matrix writes its fields. A YAML mapping has no order,
    so the same combination with the fields written in another order is the same job: a ledger
    may know it by the id that order made (see scheduler.adopt_recorded_ids)."""

    written: str  # the id written on the job
    suffixes: tuple[str, ...]
    take: int = 0  # its number among the job's variants; 0: the only take

    def reordered_base(self, other: str) -> str | None:
        """The id before any take number that gives ``other`` when this combination's fields
        are in another order (``teaser-4-16x9`` for ``teaser-16x9-4``); None if no order does."""
        tail = f"-{self.take}" if self.take else ""
        own = "-".join((self.written, *self.suffixes))
        # An id fitted to MADE_ID_MAX_LEN keeps only its start: orders are sought by that.
        fitted = len(other) == MADE_ID_MAX_LEN
        start = other[: MADE_ID_MAX_LEN - ID_HASH_CHARS - 1] if fitted else other
        for base in _orders(self.written, self.suffixes, start):
            if base != own and fit_id(base + tail) == other:
                return base
        return None


def _orders(text: str, parts: tuple[str, ...], start: str) -> Iterator[str]:
    """``text`` followed by every order of ``parts`` (each after a ``-``) that agrees with
    ``start`` as far as both go: orders that cannot give it are cut off at their first part."""
    if not parts:
        yield text
        return
    for i, part in enumerate(parts):
        longer = f"{text}-{part}"
        n = min(len(longer), len(start))
        if longer[:n] == start[:n]:
            yield from _orders(longer, parts[:i] + parts[i + 1 :], start)


@dataclass(frozen=True)
class Job:
    """One generation to make: the exact API body plus where it came from."""

    id: str
    # The POST body, "model" included; JSON-serialisable but for local images, held as
    # images.LocalImage until the create is sent (images.Inliner makes them data: URIs).
    request: Mapping[str, Any]
    index: int = 0  # 0-based position in the manifest's job list
    line: int | None = None  # 1-based line of the job in the manifest, when known
    # The request with each local image replaced by its content hash: what the key is made
    # of, so a 5 MB inlined image is never hashed once per job. None: the request itself.
    identity: Mapping[str, Any] | None = None
    source: str | None = None  # the file the job was written in, when not the manifest
    # Its id is made from its request (:func:`derived_id`), none being written: a ledger from
    # before may know it by the id its request's written spelling made (see scheduler).
    derived: bool = False
    # Take n of variants whose seed is made from the job's id (:func:`variant_seed`); 0: not.
    seeded_take: int = 0
    # A combination of a matrix of two fields or more under a written id: how its id is made.
    matrix_id: MatrixId | None = None

    @property
    def model(self) -> str:
        return str(self.request["model"])

    @functools.cached_property
    def key(self) -> str:
        """Computed once: the plan, the intent record and the file check all ask for it."""
        return request_key(self.identity if self.identity is not None else self.request)

    @functools.cached_property
    def vkey(self) -> str:
        """The video it asks for (:func:`video_key`): a rerun tells "changed" by this, so a
        default written out or a provider's case costs nothing."""
        return video_key(self.identity if self.identity is not None else self.request, self.key)

    @property
    def duration_s(self) -> int:
        """Seconds of video asked for (the model's default when the job does not say)."""
        return round(requested_duration_s(self.model, self.request))


@dataclass(frozen=True)
class ManifestSettings:
    """Run settings a manifest may carry; None means "not set here". CLI flags win."""

    concurrency: int | None = None
    job_timeout_s: float | None = None
    download_concurrency: int | None = None
    resubmit_uncertain: bool | None = None
    retry_failed: bool | None = None
    max_cost_usd: float | None = None
    prices: Mapping[str, float] = field(default_factory=dict)  # model -> USD per video second
    notify_url: str | None = None  # POST the run's summary here when it ends
    abandon_after_s: float | None = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    jobs: tuple[Job, ...]
    settings: ManifestSettings = field(default_factory=ManifestSettings)
    warnings: tuple[Problem, ...] = ()

    def job(self, job_id: str) -> Job | None:
        for j in self.jobs:
            if j.id == job_id:
                return j
        return None
