"""A simulator of the AI/ML API's Veo 3.1 video endpoints, for tests, demos and benchmarks.

Built on the published request schemas (embedded under ``schemas/``), deliberately stricter than
them where a client's mistake would cost money (see ``validation``), with a separate listener
standing in for the CDN that serves real MP4s.
"""

from .config import SimConfig
from .faults import Faults
from .server import Simulator, serve
from .state import Generation, SimStats

__all__ = ["Faults", "Generation", "SimConfig", "SimStats", "Simulator", "serve"]
