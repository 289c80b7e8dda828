from .uncertainty import SpikeUncertainty, SpikeUncertaintyScoring, spike_uncertainty

__all__ = ["SpikeUncertainty", "SpikeUncertaintyScoring", "spike_uncertainty"]
