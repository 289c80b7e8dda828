"""Hybrid CT MONAI Label app: configs, infer / train tasks, active learning, model versions, HTTP guards."""
