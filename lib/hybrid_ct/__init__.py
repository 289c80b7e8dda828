"""Hybrid CT: a multi-task hybrid spiking network for chest CT (lung, infection, diagnosis)."""

LABELS = {"background": 0, "lung": 1, "infection": 2}
"""The one label convention of the project: the lung is {1, 2}; infection lies inside the lung."""
