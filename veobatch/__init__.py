"""veobatch: a YAML manifest of Veo 3.1 video jobs in, finished MP4 files out, resumably.

The small public API below is what the CLI itself uses, so the tool can be embedded::

    import anyio, veobatch
    manifest = veobatch.load_manifest("jobs/demo.yaml")
    settings = veobatch.resolve_settings(Path("output/demo"), manifest.settings)
    report = anyio.run(veobatch.run, manifest, settings)
"""

from .errors import ManifestError, Problem, VeobatchError
from .jobs import Job, Manifest
from .manifest import load_manifest, parse_manifest
from .runner import RunReport, run
from .settings import RunSettings, Secret, resolve_settings

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
