"""Sweeps: a grid of run configurations simulated in parallel, resumably, into one table and a report.

`from sim.sweep import run_sweep` is the entry point (`sim/sweep/run.py`); the grid syntax is in
`grid.py`, how points run (this process, a process pool, Ray) in `execute.py`, the folder that
survives a kill in `store.py`, the plotly report in `report.py`.
"""

from sim.sweep.run import run_sweep

__all__ = ["run_sweep"]
