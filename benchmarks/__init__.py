"""Benchmarks: scripts run as `python benchmarks/NAME.py`; a package only so tests can import the simulator."""
