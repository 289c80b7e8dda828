from .hybrid_ct import HybridCTInfer, ModelServer

__all__ = ["HybridCTInfer", "ModelServer"]
