"""`none`: no prefetching; every miss is a demand load."""

from policies.base import PrefetchPolicy
from policies.registry import PREFETCH


@PREFETCH.register("none")
class NoPrefetch(PrefetchPolicy):
    pass
