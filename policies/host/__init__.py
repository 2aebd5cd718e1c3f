"""Host-cache policies of a tiered run (`host_cache.name`, docs/tiers.md): what host DRAM keeps.

`HOST_POLICIES` maps each name to its `policies.base.HostCachePolicy` class; `host_policy(name)`
is the class or a `UserError` listing the names.
"""

from __future__ import annotations

from policies.host.belady import HostBelady
from policies.host.lfu import HostLFU
from policies.host.lru import HostLRU
from policies.host.static import HostStatic
from sim.errors import UserError

HOST_POLICIES = {"lru": HostLRU, "lfu": HostLFU, "static": HostStatic, "belady": HostBelady}


def host_policy(name: str):
    cls = HOST_POLICIES.get(name)
    if cls is None:
        raise UserError(f"host_cache.name={name!r}: choose one of {', '.join(HOST_POLICIES)}")
    return cls
