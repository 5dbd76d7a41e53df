"""The Veo 3.1 model catalogue, written from the API's published request schemas.

The package carries this table instead of reading the OpenAPI files at run time, so a run
depends on nothing outside the wheel. ``tests/test_catalogue.py`` checks it against the
published schemas whenever they are available beside the repository.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

FieldType = Literal["string", "integer", "boolean", "image", "image_list"]

# Providers named by the API's prose; the schema only says "string", matched case-insensitively.
PROVIDERS = ("auto", "google", "fal")
CASE_INSENSITIVE = frozenset({"provider"})  # fields the API matches in any case


@dataclass(frozen=True)
class FieldSpec:
    """One request field of one model."""

    name: str
    type: FieldType
    required: bool = False
    enum: tuple[str | int, ...] | None = None
    default: str | int | bool | None = None
    description: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """One model: its request fields and what a second of its video is assumed to cost."""

    name: str
    fields: Mapping[str, FieldSpec]
    usd_per_second: float

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields.values() if f.required)


def _fields(*specs: FieldSpec) -> dict[str, FieldSpec]:
    return {s.name: s for s in specs}


_PROMPT = FieldSpec(
    "prompt",
    "string",
    required=True,
    description="The text description of the scene, subject, or action to generate in the video.",
)
_RESOLUTION = FieldSpec("resolution", "string", enum=("720p", "1080p"), default="1080p")
_AUDIO = FieldSpec(
    "generate_audio", "boolean", default=True, description="Whether to generate audio."
)
_PROVIDER = FieldSpec(
    "provider",
    "string",
    enum=PROVIDERS,
    default="auto",
    description="Provider routing override: auto (Google, falling back to fal.ai), google, fal.",
)
_ASPECT = FieldSpec(
    "aspect_ratio", "string", enum=("16:9", "9:16"), description="Aspect ratio of the video."
)
# The schemas publish the default as the string "8" for an integer field; 8 is what is meant.
_DURATION = FieldSpec(
    "duration", "integer", enum=(4, 6, 8), default=8, description="Video length in seconds."
)
_IMAGE = FieldSpec(
    "image_url",
    "image",
    required=True,
    description="URL (or data: URI) of the input image. Should be 720p or higher resolution.",
)
_LAST_IMAGE = FieldSpec(
    "last_image_url",
    "image",
    required=True,
    description="URL (or data: URI) of the image used as the last frame of the video.",
)
_T2V_EXTRA = (
    FieldSpec("seed", "integer", description="Same seed and request give similar results."),
    FieldSpec("auto_fix", "boolean", default=True, description="Rewrite prompts that fail policy."),
    FieldSpec("negative_prompt", "string", description="What to avoid in the video."),
    FieldSpec("enhance_prompt", "boolean", default=True, description="Enhance the prompt."),
)

# Prices are not published by the API; these are third-party figures (see the README).
_STANDARD_USD_S = 0.40
_FAST_USD_S = 0.15

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "google/veo-3.1-reference-to-video",
            _fields(
                _PROMPT,
                FieldSpec(
                    "image_urls",
                    "image_list",
                    required=True,
                    description="Reference images (URLs or data: URIs), 720p or larger.",
                ),
                FieldSpec("duration", "integer", enum=(8,), default=8, description="Always 8 s."),
                _RESOLUTION,
                _AUDIO,
                _PROVIDER,
            ),
            _STANDARD_USD_S,
        ),
        *(
            ModelSpec(
                f"google/veo-3.1-first-last-image-to-video{suffix}",
                _fields(
                    _PROMPT, _IMAGE, _LAST_IMAGE, _ASPECT, _DURATION, _RESOLUTION, _AUDIO, _PROVIDER
                ),
                price,
            )
            for suffix, price in (("", _STANDARD_USD_S), ("-fast", _FAST_USD_S))
        ),
        *(
            ModelSpec(
                f"google/veo-3.1-i2v{suffix}",
                _fields(_PROMPT, _IMAGE, _ASPECT, _DURATION, _RESOLUTION, _AUDIO, _PROVIDER),
                price,
            )
            for suffix, price in (("", _STANDARD_USD_S), ("-fast", _FAST_USD_S))
        ),
        *(
            ModelSpec(
                f"google/veo-3.1-t2v{suffix}",
                _fields(_PROMPT, _ASPECT, _DURATION, _RESOLUTION, _AUDIO, *_T2V_EXTRA, _PROVIDER),
                price,
            )
            for suffix, price in (("", _STANDARD_USD_S), ("-fast", _FAST_USD_S))
        ),
    )
}

# Every request field any model accepts, besides "model" itself.
ALL_FIELDS: frozenset[str] = frozenset(name for m in MODELS.values() for name in m.fields)


def get_model(name: str) -> ModelSpec | None:
    return MODELS.get(name)
