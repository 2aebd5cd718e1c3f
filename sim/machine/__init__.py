"""The machine: hardware profiles, model presets, the cost model, memory contention."""
