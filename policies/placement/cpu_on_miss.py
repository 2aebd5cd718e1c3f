"""`cpu_on_miss`: compute a missed expert on the CPU where it lives, instead of loading it (Fiddler).

The CPU stream runs it with the profile's CPU figures (`hw.cpu`: memory bandwidth, FLOPs,
overhead), in parallel with the device's work on resident experts; the layer ends when both are
done. Activations moved to and from the host are small at batch 1 and are not modelled.
"""

from policies.base import CPU, PlacementPolicy
from policies.registry import PLACEMENT


@PLACEMENT.register("cpu_on_miss")
class CpuOnMiss(PlacementPolicy):
    def place(self, key: int, t: int, weight: float) -> str:
        return CPU
