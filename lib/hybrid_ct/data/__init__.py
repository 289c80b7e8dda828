"""Training data: the real data folder and its manifest, the sources as model-space slice sets, whole scans, phantoms, downloads.

The public surface, importable from here (each name loads its module on first use):

- ``slice_store``: ``SliceSet``, ``SourceSet``, ``MISSING``, ``slices_from_arrays``, ``slices_from_volume``
- ``manifest``: ``data_root``, ``read_manifest``, ``canonical_group``, ``split_sets``, ``val_groups_for``, ``combine``
- ``sources``: ``load_sources``, ``load_medseg``, ``load_cls2d``, ``load_imlab``, ``load_majun``, ``load_phantoms``, ``load_prepared``
- ``wholescans``: ``load_wholescans``
- ``phantom``: ``make_phantom``, ``write_phantom_set``
- ``lesions``: ``synthesize``, ``lesion_slice``, ``KINDS``
- ``protocol``: ``protocol_slice``, ``variant``, ``VARIANTS``
- ``download``: ``REGISTRY`` (and ``hybrid_ct.data.download.download``: a function may not share its module's name here)
"""

from hybrid_ct.lazy import lazy_surface

_HOME = {
    "SliceSet": "slice_store",
    "SourceSet": "slice_store",
    "MISSING": "slice_store",
    "slices_from_arrays": "slice_store",
    "slices_from_volume": "slice_store",
    "data_root": "manifest",
    "read_manifest": "manifest",
    "canonical_group": "manifest",
    "split_sets": "manifest",
    "val_groups_for": "manifest",
    "combine": "manifest",
    "load_sources": "sources",
    "load_medseg": "sources",
    "load_cls2d": "sources",
    "load_imlab": "sources",
    "load_majun": "sources",
    "load_phantoms": "sources",
    "load_prepared": "sources",
    "load_wholescans": "wholescans",
    "make_phantom": "phantom",
    "write_phantom_set": "phantom",
    "synthesize": "lesions",
    "lesion_slice": "lesions",
    "KINDS": "lesions",
    "protocol_slice": "protocol",
    "variant": "protocol",
    "VARIANTS": "protocol",
    "REGISTRY": "download",
}
__getattr__, __all__ = lazy_surface(__name__, _HOME)
