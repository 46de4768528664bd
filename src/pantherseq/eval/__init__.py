"""Evaluation: next-behaviour ranking (nextevent.py), user-level probes of frozen representations (probe.py,
representation.py), the SPRM prototype analysis (prototypes.py) and the metrics they share (metrics.py)."""
