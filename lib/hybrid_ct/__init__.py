"""Hybrid CT: a multi-task hybrid spiking network for chest CT (lung, infection, diagnosis)."""

from hybrid_ct.contract import LABELS  # noqa: F401  (the one label convention: hybrid_ct/contract.json)
