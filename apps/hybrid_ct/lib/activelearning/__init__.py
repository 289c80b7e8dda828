from .diverse import DiverseUncertainty, novelty
from .uncertainty import SpikeUncertainty, SpikeUncertaintyScoring, descriptor, spike_uncertainty

__all__ = ["DiverseUncertainty", "SpikeUncertainty", "SpikeUncertaintyScoring", "descriptor", "novelty",
           "spike_uncertainty"]
