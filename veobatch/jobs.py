"""What a validated manifest becomes: plain frozen values the pipeline consumes.

Kept apart from the loader so the scheduler, ledger and CLI depend on these types only,
never on YAML or pydantic.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Problem
from .jobview import requested_duration_s


def canonical_json(value: Any) -> str:
    """One spelling per value, so equal requests hash equally across runs and machines."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(request: Mapping[str, Any]) -> str:
    """The identity of a request: sha256 of its canonical JSON (model included)."""
    return hashlib.sha256(canonical_json(dict(request)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Job:
    """One generation to make: the exact API body plus where it came from."""

    id: str
    request: Mapping[str, Any]  # the full POST body, "model" included; JSON-serialisable
    index: int = 0  # 0-based position in the manifest's job list
    line: int | None = None  # 1-based line of the job in the manifest, when known
    # The request with each local image replaced by its content hash: what the key is made
    # of, so a 5 MB inlined image is never hashed once per job. None: the request itself.
    identity: Mapping[str, Any] | None = None
    source: str | None = None  # the file the job was written in, when not the manifest

    @property
    def model(self) -> str:
        return str(self.request["model"])

    @functools.cached_property
    def key(self) -> str:
        """Computed once: the plan, the intent record and the file check all ask for it."""
        return request_key(self.identity if self.identity is not None else self.request)

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
