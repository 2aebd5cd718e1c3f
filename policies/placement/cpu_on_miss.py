"""`cpu_on_miss`: compute a missed expert on the CPU where it lives, instead of loading it (Fiddler).

The CPU stream runs it with the profile's CPU figures (`hw.cpu`: memory bandwidth, FLOPs,
overhead), in parallel with the device's work on resident experts; the layer ends when both are
done. Activations moved to and from the host are small at batch 1 and are not modelled.
Needs the offloaded experts in host memory (`expert_tier: host`), or a host cache in front of
storage (a tiered run, docs/tiers.md: an expert not in the host cache is read into it first, and
the CPU computes it once read); refused otherwise.
"""

from policies.base import CPU, Context, PlacementPolicy
from policies.registry import PLACEMENT
from sim.errors import UserError


def require_host_experts(ctx: Context, name: str) -> None:
    """CPU placement computes an expert where it lives: host memory (or a host cache), not storage."""
    tier = getattr(ctx.hw, "expert_tier", "host")
    if tier != "host" and not getattr(ctx.hw, "host_tier", False):
        raise UserError(f"placement {name!r} computes missed experts in host memory, but this hardware "
                        f"profile keeps offloaded experts in {tier!r} with no host cache; use placement.name=load "
                        f"(or a profile with a host cache in front of storage: docs/tiers.md)")


@PLACEMENT.register("cpu_on_miss")
class CpuOnMiss(PlacementPolicy):
    may_use_cpu = True

    def __init__(self, knobs: object, ctx: Context):
        super().__init__(knobs, ctx)
        require_host_experts(ctx, "cpu_on_miss")

    def place(self, key: int, t: int, weight: float) -> str:
        return CPU
