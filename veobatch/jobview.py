"""What the operator's views need to know of a request: its compact form, its video, its price.

The ledger's ``intent`` record carries :func:`compact_request`, so ``status`` and ``report`` can
show a job's prompt and parameters from the output directory alone, without the manifest.
Pure functions only; see :mod:`veobatch.verify` for the file side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .catalogue import get_model

MAX_INLINE_CHARS = 200  # a data: URI longer than this is summarised, never copied into records
SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}
_SECONDS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*s?\s*$")


class Inlined:
    """A value sent as a data: URI made only when its create is sent (images.LocalImage):
    records show it as they would that URI, from its head and length, without encoding it."""

    __slots__ = ()

    @property
    def uri_head(self) -> str:
        """``data:<mime>;base64``"""
        raise NotImplementedError

    @property
    def uri_chars(self) -> int:
        raise NotImplementedError


def _compact_value(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("data:") and len(value) > MAX_INLINE_CHARS:
        head = value.split(",", 1)[0]
        return f"{head},… ({len(value) // 1024} KiB)"
    if isinstance(value, Inlined):  # summarised as its data: URI is, to the letter
        return f"{value.uri_head},… ({value.uri_chars // 1024} KiB)"
    if isinstance(value, list):
        return [_compact_value(v) for v in value]
    return value


def compact_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """The request without ``model`` (recorded beside it) and with inline images summarised."""
    return {k: _compact_value(v) for k, v in request.items() if k != "model"}


def _default(model: str, name: str) -> Any:
    spec = get_model(model)
    field = spec.fields.get(name) if spec else None
    return field.default if field else None


def parse_duration_s(value: Any) -> float | None:
    """Seconds from ``8``, ``8.0``, ``"8"`` or ``"8s"``; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (m := _SECONDS.match(value)):
        return float(m.group(1))
    return None


def requested_duration_s(model: str, request: Mapping[str, Any]) -> float:
    """The length asked for, or the model's default (8 s when the catalogue does not say)."""
    found = parse_duration_s(request.get("duration"))
    if found is None:
        found = parse_duration_s(_default(model, "duration"))
    return found if found is not None else 8.0


@dataclass(frozen=True)
class Expected:
    """The video a request should produce."""

    duration_s: float
    width: int | None  # None: a resolution this table does not know
    height: int | None
    audio: bool
    # No aspect ratio asked for and none documented as the default (a portrait first frame
    # may well give a portrait video): either orientation of the size is as requested.
    any_orientation: bool = False


def expected_video(model: str, request: Mapping[str, Any]) -> Expected:
    resolution = request.get("resolution") or _default(model, "resolution") or "1080p"
    asked = request.get("aspect_ratio") or _default(model, "aspect_ratio")
    aspect = asked or "16:9"
    size = SIZES.get(str(resolution))
    width, height = size if size else (None, None)
    if aspect == "9:16" and size:
        width, height = height, width
    audio = request.get("generate_audio")
    if not isinstance(audio, bool):
        default = _default(model, "generate_audio")
        audio = default if isinstance(default, bool) else True
    return Expected(requested_duration_s(model, request), width, height, audio, not asked)


def list_price_usd(model: str, request: Mapping[str, Any]) -> float:
    """What one generation costs at the catalogue's list price (0 for an unknown model)."""
    spec = get_model(model)
    return spec.usd_per_second * requested_duration_s(model, request) if spec else 0.0


def parameters(request: Mapping[str, Any]) -> dict[str, Any]:
    """The request's fields other than the prompt and the model, for display."""
    return {k: v for k, v in request.items() if k not in ("model", "prompt")}
