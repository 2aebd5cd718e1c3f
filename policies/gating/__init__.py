"""Gating policies: one file each; each registers itself with `policies.registry`."""
