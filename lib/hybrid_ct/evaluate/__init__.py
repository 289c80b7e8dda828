"""Evaluation of built models: validation metrics, pictures, the whole-scan check, seeds, side-by-side comparisons and the documents they render.

The public surface, importable from here (each name loads its module on first use):

- ``validation``: ``evaluate_checkpoints``, ``evaluate_sets``
- ``results_doc``: ``write_results``, ``update_model_card``
- ``scan_check``: ``run_scan_check``
- ``seeds``: ``gate``, ``median_seed``
- ``compare``: ``table``
- ``pictures``: ``loso_results``
"""

from hybrid_ct.lazy import lazy_surface

_HOME = {
    "evaluate_checkpoints": "validation",
    "evaluate_sets": "validation",
    "write_results": "results_doc",
    "update_model_card": "results_doc",
    "run_scan_check": "scan_check",
    "gate": "seeds",
    "median_seed": "seeds",
    "table": "compare",
    "loso_results": "pictures",
}
__getattr__, __all__ = lazy_surface(__name__, _HOME)
