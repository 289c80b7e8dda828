"""Prediction: the ``Predictor`` (one CT -> label map + report) and the batch over files, DICOM series and PACS trees, with its outputs (NIfTI, DICOM-SEG, overlays, PDF).

The public surface, importable from here (each name loads its module on first use):

- ``predictor``: ``Predictor``
- ``batch``: ``expand_inputs``
- ``runner``: ``predict_batch`` (one process, resumable through ``manifest.jsonl``)
- ``cluster``: ``predict_on_cluster`` (the same batch on a Dask cluster: ``--workers N`` / ``--cluster ADDRESS``)
- ``manifest``: ``Manifest``, ``file_sha256``
- ``dicom_seg``: ``write_dicom_seg``, ``read_dicom_seg``
- ``pdf_report``: ``write_scan_report``
- ``overlays``: ``overlay_panels``, ``results_view``
"""

from hybrid_ct.lazy import lazy_surface

_HOME = {
    "Predictor": "predictor",
    "predict_batch": "runner",
    "predict_on_cluster": "cluster",
    "Manifest": "manifest",
    "file_sha256": "manifest",
    "expand_inputs": "batch",
    "write_dicom_seg": "dicom_seg",
    "read_dicom_seg": "dicom_seg",
    "write_scan_report": "pdf_report",
    "overlay_panels": "overlays",
    "results_view": "overlays",
}
__getattr__, __all__ = lazy_surface(__name__, _HOME)
