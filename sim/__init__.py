"""moe-offload-sim: a trace-driven discrete-event simulator of MoE expert offloading.

Packages: `sim` (engine, CLI, trace I/O, tracer, real-run backend) and `policies`
(gating, prefetch, cache and placement policies, one file each).
Nothing here imports torch at module level: `run` and `sweep` stay light.
"""

from pathlib import Path

__version__ = "0.1.0"

#: The repository root (an editable install keeps `hwprofiles/`, `traces/` and `models/` here).
REPO_ROOT = Path(__file__).resolve().parent.parent
