"""Label map <-> named segments, by NAME (never by position in the segment list).

Label convention of the project (``contract.json``): 0 background, 2 infection (inside the lung), 3 right
lung and 4 left lung (non-infected parenchyma; the server assigns the sides geometrically, it does not learn
them), and 1 lung without a side (labels drawn as one lung segment, before the sides). The segmentation
shown in Slicer has one segment per predicted label, "Right lung", "Left lung" and "Infection" (and "Lung"
only when the label map holds value 1); when the radiologist sends a correction, each segment is found by
its name (case insensitive, a few synonyms accepted) whatever its position in the list, later labels of the
contract win where segments overlap (infection over lung), and anything else is refused with a message (or
ignored on request, with a warning). One "Lung" segment instead of the two sides is accepted and sent as
lung without a side: it trains the lung as the sides do. MONAI Label's own plugin maps label values by
segment position: a reordered or an extra segment silently corrupts the label sent back. Ours cannot.

Names, synonyms, colours and terminology codes come from ``contract.json`` beside this file: a
byte-identical copy of the project's one contract, ``lib/hybrid_ct/contract.json`` (the extension ships
without the ``hybrid_ct`` package, so it carries the file; tests/test_contract.py checks the copy).
Terminology: the lungs are SCT 123037004 "Anatomical Structure" / SCT 39607008 "Lung", with the type
modifier SCT 24028007 "Right" or SCT 7771000 "Left" for the sided ones (Lung's modifiers in Slicer's
DICOM master list); Infection is SCT 49755003 "Morphologically Altered Structure" / SCT 23583003
"Inflammation" (DICOM CID 7159, as listed in Slicer's
Terminologies/Resources/SegmentationCategoryTypeModifier-DICOM-Master.json; the former "Lesion"
SCT 52988006 is in none of the lists Slicer ships) in the anatomic region SCT 39607008 "Lung".
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

CONTRACT: dict = json.loads(Path(__file__).with_name("contract.json").read_text(encoding="utf-8"))
SLICER_CATEGORY_CONTEXT = CONTRACT["terminology"]["category_context"]
SLICER_ANATOMIC_CONTEXT = CONTRACT["terminology"]["anatomic_context"]

ALL_LABEL_INFO: list[dict] = [
    {"name": d["segment"], "idx": d["value"], "server_name": d["name"], "color": tuple(d["color"]),
     "description": d["description"], "category": tuple(d["category"]), "type": tuple(d["type"]),
     "type_modifier": tuple(d["type_modifier"]) if d.get("type_modifier") else None,
     "anatomic_region": tuple(d["anatomic_region"]) if d["anatomic_region"] else None,
     "synonyms": tuple(d["synonyms"]), "predicted": d.get("predicted", True)}
    for d in CONTRACT["labels"] if d["value"]
]
"""Every label a correction may hold, in the contract's drawing order (a later one wins where segments overlap)."""
LABEL_INFO: list[dict] = [d for d in ALL_LABEL_INFO if d["predicted"]]
"""The segments the module shows (and a correction needs): the labels a prediction holds."""

LABEL_BY_IDX = {d["idx"]: d for d in ALL_LABEL_INFO}
LABEL_BY_NAME = {d["name"]: d for d in ALL_LABEL_INFO}
_UNSIDED = next(d for d in ALL_LABEL_INFO if not d["predicted"])
LUNG_TYPE = _UNSIDED["type"]  # SCT Lung: every lung segment, sided or not, has this type
UNSIDED_LUNG = _UNSIDED["name"]  # "Lung": one segment standing for both sided lung segments
_SIDED = {d["name"] for d in LABEL_INFO if d["type"] == _UNSIDED["type"] and d["type_modifier"]}


class SegmentError(ValueError):
    """The segments cannot be turned into a label map; the message says why and what to do."""


class SegmentWarning(UserWarning):
    """Something was ignored on the user's request (e.g. extra segments)."""


def normalise_name(name: str) -> str:
    """Lower case, '_' / '-' / repeated blanks -> one blank, no surrounding blanks."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


_SYNONYMS = {normalise_name(s): d["name"] for d in ALL_LABEL_INFO for s in (d["name"],) + tuple(d["synonyms"])}


def canonical_segment_name(name: str) -> str | None:
    """'lungs', 'LUNG', 'Lung_parenchyma' -> 'Lung'; 'lung_left' -> 'Left lung'; 'GGO' -> 'Infection'; unknown ->
    None."""
    return _SYNONYMS.get(normalise_name(name))


def server_label_info() -> list[dict]:
    """``label_info`` sent with a label: every contract label by name and value (``[{"name": "lung", "idx": 1},
    {"name": "right_lung", "idx": 3}, ...]``)."""
    return [{"name": d["server_name"], "idx": d["idx"]} for d in ALL_LABEL_INFO]


def server_label_names() -> dict[str, int]:
    return {d["server_name"]: d["idx"] for d in ALL_LABEL_INFO}


def color01(name: str) -> tuple[float, float, float]:
    r, g, b = LABEL_BY_NAME[name]["color"]
    return (r / 255.0, g / 255.0, b / 255.0)


def _code(c: tuple[str, str, str] | None) -> str:
    return "^".join(c) if c else "^^"


def terminology_entry(name: str) -> str:
    """Slicer terminology entry string for the segment (the segment's ``TerminologyEntry`` tag)."""
    d = LABEL_BY_NAME[name]
    return "~".join([
        SLICER_CATEGORY_CONTEXT,
        _code(d["category"]),
        _code(d["type"]),
        _code(d["type_modifier"]),
        SLICER_ANATOMIC_CONTEXT,
        _code(d["anatomic_region"]),
        "^^",  # region modifier
    ])


def resolve_segment_names(names: Iterable[str], *, ignore_extra: bool = False,
                          require_all: bool = True) -> dict[str, str]:
    """Map the segment names found in a segmentation to our names.

    Returns ``{our name: the segment's own name}``. Raises :class:`SegmentError` when two
    segments claim the same label, when an unknown segment is present (unless ``ignore_extra``,
    then a :class:`SegmentWarning` lists them) or when a required segment is missing.
    """
    found: dict[str, str] = {}
    extra: list[str] = []
    for seg_name in names:
        ours = canonical_segment_name(seg_name)
        if ours is None:
            extra.append(str(seg_name))
            continue
        if ours in found:
            raise SegmentError(
                f"Segments {found[ours]!r} and {seg_name!r} both mean {ours!r}: merge them or rename one "
                f"before submitting.")
        found[ours] = str(seg_name)
    if extra:
        expected = ", ".join(repr(d["name"]) for d in ALL_LABEL_INFO)
        if not ignore_extra:
            raise SegmentError(
                f"The segmentation has segments the model does not know: {', '.join(map(repr, extra))}. "
                f"Only {expected} are sent to the server; delete or rename the others, or tick "
                f"'Ignore other segments'.")
        warnings.warn(f"Ignored segments not sent to the server: {', '.join(map(repr, extra))}",
                      SegmentWarning, stacklevel=3)
    if require_all:
        # one unsided "Lung" segment stands for both sides
        needed = [d["name"] for d in LABEL_INFO if not (d["name"] in _SIDED and UNSIDED_LUNG in found)]
        missing = [name for name in needed if name not in found]
        if missing:
            raise SegmentError(
                f"Segment {' and '.join(map(repr, missing))} is missing. Add "
                f"{'it' if len(missing) == 1 else 'them'} (an empty segment is fine, e.g. 'Infection' on a "
                f"negative scan) so that the server knows the region was checked.")
    return found


def export_labelmap_by_name(segment_arrays: Mapping[str, np.ndarray], *, ignore_extra: bool = False,
                            require_all: bool = True) -> tuple[np.ndarray, list[dict]]:
    """Build the label map (uint8, contract values) from ``{segment name: mask}``, matching by NAME.

    Masks must share one shape; any non-zero voxel is inside. Right lung -> 3, Left lung -> 4, Lung (no
    side) -> 1, Infection -> 2; where they overlap the later label of the contract wins (infection over
    any lung). Returns ``(labelmap, label_info)`` with ``label_info`` as sent to the server
    (``server_label_info()``).
    """
    if not segment_arrays:
        raise SegmentError("The segmentation has no segments: nothing to submit.")
    mapping = resolve_segment_names(segment_arrays.keys(), ignore_extra=ignore_extra, require_all=require_all)
    if not mapping:
        raise SegmentError("None of the segments is a lung or 'Infection': nothing to submit.")
    shapes = {name: np.shape(segment_arrays[seg]) for name, seg in mapping.items()}
    if len(set(shapes.values())) != 1:
        raise SegmentError(f"Segment masks differ in shape: {shapes}; export them on one reference volume.")
    shape = next(iter(shapes.values()))
    out = np.zeros(shape, dtype=np.uint8)
    # the contract's drawing order: later labels (infection) override where segments overlap
    for d in ALL_LABEL_INFO:
        seg = mapping.get(d["name"])
        if seg is None:
            continue
        out[np.asarray(segment_arrays[seg]) != 0] = d["idx"]
    return out, server_label_info()


def split_labelmap(labelmap: np.ndarray, *, allow_unknown: bool = False) -> dict[str, np.ndarray]:
    """Label map -> ``{"Right lung": bool mask, "Left lung": ..., "Infection": ...}`` (every predicted label,
    maybe empty; "Lung" too when the map holds lung without a side)."""
    arr = np.asarray(labelmap)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise SegmentError("The label map has non-integer values: it is not a label map.")
    values = set(np.unique(arr).astype(int).tolist()) - {0}
    unknown = sorted(values - set(LABEL_BY_IDX))
    if unknown and not allow_unknown:
        known = ", ".join(f"{d['name'].lower()} ({d['idx']})" for d in ALL_LABEL_INFO)
        raise SegmentError(f"The label map has values {unknown} that are none of {known}.")
    return {d["name"]: arr == d["idx"] for d in ALL_LABEL_INFO if d["predicted"] or d["idx"] in values}
