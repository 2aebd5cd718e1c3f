"""Serving: many requests, each replaying one sequence of the trace (workloads in `sim.serving.workload`)."""
