"""The parts of bench/gpu.py: `timer` (inside each run), `cells` (the runs), `report` (the table)."""
