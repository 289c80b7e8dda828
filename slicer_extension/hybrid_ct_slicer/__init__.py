"""Qt-free logic of the Hybrid CT 3D Slicer extension.

Everything here runs in Slicer's own Python with nothing installed: it imports only what Slicer
ships (numpy, requests, SimpleITK), and equally runs in a plain CPython for the tests:

- :mod:`.settings`  server URL validation / normalisation
- :mod:`.client`    HTTP client for the MONAI Label server (requests)
- :mod:`.segments`  label map <-> named segments ("Right lung" = 3, "Left lung" = 4, "Infection" = 2;
  "Lung" = 1 without a side), by NAME, from ``contract.json``
  (a copy of the project's label and report contract, lib/hybrid_ct/contract.json)
- :mod:`.results`   infer result params -> strings for the results panel
- :mod:`.imageio`   label / volume files through SimpleITK, with their LPS geometry
- :mod:`.workflow`  the flows behind the module's buttons (run, submit, next sample, train, ...)
- :mod:`.testdata`  a small phantom-like chest volume built with numpy
- :mod:`.mrml`      MRML helpers (needs Slicer or the ``slicer-core`` wheel; imported on demand)
"""

__version__ = "0.1.0"

from .client import HybridCTClient, ServerError  # noqa: F401
from .segments import LABEL_INFO, SegmentError, export_labelmap_by_name  # noqa: F401
from .settings import normalise_server_url  # noqa: F401
