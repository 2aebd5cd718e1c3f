"""The real-run backend (DESIGN 7): replay a trace with real tensors and real data movement.

Pieces, one concept per module:
    backend.py   the device (CPU or CUDA): tensors, pinned host memory, synchronisation
    store.py     the offloaded tier: safetensors files on disk (page cache dropped) or host memory
    link.py      the copy worker: one thread (CPU) / one CUDA stream, demand ahead of prefetch
    tiers.py     a tiered run's host tier: disk -> host buffers (read worker) -> slots, the simulator's books
    compute.py   batch-1 SwiGLU experts, the non-expert stand-in, the CPU worker (placement=cpu)
    engine.py    the decode/prefill loop: the simulator's order of policy calls with real work
    build.py     config -> trace, preset, profile and the very policy objects the simulator uses
    run.py       `realrun` on a trace (random weights of the preset's shapes)
    live.py      `realrun model=DIR`: a live checkpoint's forward pass, experts from the store
    calibrate.py microbenchmarks -> a hardware profile (`calibrate`)
    confirm.py   `realrun` beside `run` per policy arm, errors and ranking (`confirm`)

Only `sim.commands.realrun/calibrate/confirm` import this package, so `run` and `sweep` never
import torch.
"""
