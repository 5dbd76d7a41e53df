"""veobatch: a YAML manifest of Veo 3.1 video jobs in, finished MP4 files out, resumably.

The small public API below is what the CLI itself uses, so the tool can be embedded::

    from pathlib import Path
    import anyio, veobatch
    manifest = veobatch.load_manifest("jobs/demo.yaml")
    settings = veobatch.resolve_settings(Path("output/demo"), manifest.settings)
    report = anyio.run(veobatch.run, manifest, settings)

``run`` does the run itself (and holds the output directory's lock meanwhile); the command
line's extras around it, ``report.html`` and the webhook, are not part of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import ManifestError, Problem, VeobatchError
    from .jobs import Job, Manifest
    from .manifest import load_manifest, parse_manifest
    from .runner import RunReport
    from .session import run
    from .settings import RunSettings, Secret, resolve_settings

# Imported on first use: `import veobatch` costs nothing, so the command's entry point can
# set its signal handlers before the 0.2 s of importing aiohttp and the rest.
_HOME = {
    "ManifestError": ".errors",
    "Problem": ".errors",
    "VeobatchError": ".errors",
    "Job": ".jobs",
    "Manifest": ".jobs",
    "load_manifest": ".manifest",
    "parse_manifest": ".manifest",
    "RunReport": ".runner",
    "run": ".session",
    "RunSettings": ".settings",
    "Secret": ".settings",
    "resolve_settings": ".settings",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'veobatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Job",
    "Manifest",
    "ManifestError",
    "Problem",
    "RunReport",
    "RunSettings",
    "Secret",
    "VeobatchError",
    "load_manifest",
    "parse_manifest",
    "resolve_settings",
    "run",
]
