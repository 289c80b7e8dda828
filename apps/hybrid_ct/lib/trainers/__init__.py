from .hybrid_ct import HybridCTTrain

__all__ = ["HybridCTTrain"]
