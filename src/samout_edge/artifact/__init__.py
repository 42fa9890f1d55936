"""The contracts every step shares, importing nothing of ours but errors/progress.

export.json (manifest.py), engine.json (engine.py), the graph's I/O names,
dtypes and empty state (graph.py), model sizes (config.py), golden outputs
(golden.py) and writes that never leave a half-written artifact (files.py).
Anything that reads or writes an artifact directory goes through here, so the
workstation side (torch) and the device side (no torch) cannot drift apart.
"""
