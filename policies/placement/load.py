"""`load`: always bring a missed expert to the device and compute it there."""

from policies.base import PlacementPolicy
from policies.registry import PLACEMENT


@PLACEMENT.register("load")
class Load(PlacementPolicy):
    always_load = True
