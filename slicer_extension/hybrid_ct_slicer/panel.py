"""The panel's decisions around patients and edits, free of Qt and MRML (tested headless).

- :func:`plan_volume_switch`: the views switched to another volume (patient): clear the results, hide
  the segmentations made on other volumes, select the one made on this volume (or none);
- :func:`edit_pairing`: "Edit in Segment Editor" never pairs one volume's segments with another CT;
- :func:`arrival_decision`: a Run result arrives; the segmentation it would replace was edited while the
  job ran -> ``"ask"`` (never a silent replace);
- :func:`grid_relation`: how a segmentation's labelmap grid relates to the volume's grid (same grid,
  resampled onto it, or content outside it) before a correction is sent;
- :func:`submit_questions`: the refusal or the question the module shows BEFORE anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

#: shown in the panel, in the status line of every result and stored on the segmentation (model card)
RESEARCH_NOTICE = "Research use only, not for diagnosis: the results are a model's output, not a clinical finding."


# ------------------------------------------------------------------------------- patient switch
@dataclass(frozen=True)
class SegRecord:
    """A segmentation node as the panel sees it: its id and the volume it was made on (None: unknown)."""
    node_id: str
    volume_id: str | None
    made_by_module: bool = False


@dataclass(frozen=True)
class SwitchPlan:
    clear_results: bool  # the panel's classification / burden / grade belong to another volume
    select: str | None  # the segmentation to select (made on the new volume), or None
    hide: tuple = ()  # segmentations of other volumes: hidden in the views and deselected
    show: tuple = ()
    reason: str = ""


def plan_volume_switch(volume_id: str | None, results_volume_id: str | None, selected_id: str | None,
                       segmentations: Iterable[SegRecord]) -> SwitchPlan:
    """What the panel does when ``volume_id`` becomes the volume in use (views switched, a new study
    loaded, the selector changed). ``results_volume_id``: the volume the results shown were made on."""
    segs = list(segmentations)
    by_id = {s.node_id: s for s in segs}
    own = [s for s in segs if volume_id is not None and s.volume_id == volume_id]
    selected = by_id.get(selected_id) if selected_id else None
    if selected is not None and selected.volume_id in (None, volume_id) and volume_id is not None:
        select = selected.node_id  # a hand-made segmentation of unknown volume stays selected (Submit checks it)
    else:
        select = (([s for s in own if s.made_by_module] or own)[-1].node_id) if own else None
    hide = tuple(s.node_id for s in segs if s.volume_id is not None and s.volume_id != volume_id)
    if selected is not None and selected.node_id != select and selected.node_id not in hide \
            and selected.volume_id is not None:
        hide += (selected.node_id,)
    clear = results_volume_id is not None and results_volume_id != volume_id
    reason = ("another volume is in use: results of the previous one cleared" if clear else
              "same volume" if results_volume_id == volume_id and volume_id is not None else "no results shown")
    return SwitchPlan(clear, select, hide, (select,) if select else (), reason)


def edit_pairing(seg_volume_id: str | None, volume_id: str | None, *, seg_name: str = "the segmentation",
                 volume_name: str = "the volume", seg_volume_name: str | None = None) -> str | None:
    """None when the Segment Editor may open ``seg`` over ``volume``; else the refusal message."""
    if volume_id is None:
        return "Choose the CT volume first."
    if seg_volume_id is not None and seg_volume_id != volume_id:
        other = f"volume '{seg_volume_name}'" if seg_volume_name else "another volume"
        return (f"{seg_name} was made on {other}, not on {volume_name}: it is not opened over this CT. "
                f"Show that volume again, or run the model on {volume_name}.")
    return None


# ------------------------------------------------------------------------------- edits during Run
def arrival_decision(target_exists: bool, fingerprint_at_start: str | None, fingerprint_now: str | None) -> str:
    """A Run result arrives for the segmentation ``target`` chosen when Run was pressed:
    ``"new"`` (no target, or it was deleted meanwhile), ``"replace"`` (unchanged since Run was pressed),
    ``"ask"`` (edited while the job ran: the module asks, it never silently replaces)."""
    if not target_exists or fingerprint_at_start is None:
        return "new"
    return "replace" if fingerprint_now == fingerprint_at_start else "ask"


# ------------------------------------------------------------------------------- foreign corrections
@dataclass(frozen=True)
class GridRelation:
    kind: str  # "same", "resample", "outside", "empty"
    outside_fraction: float = 0.0
    detail: str = ""


def _corners(extent: Sequence[int]) -> np.ndarray:
    i0, i1, j0, j1, k0, k1 = extent
    return np.array([[i, j, k, 1.0] for i in (i0 - 0.5, i1 + 0.5) for j in (j0 - 0.5, j1 + 0.5)
                     for k in (k0 - 0.5, k1 + 0.5)])


def grid_relation(seg_ijk_to_ras, seg_content_extent: Sequence[int] | None, volume_ijk_to_ras,
                  volume_dims: Sequence[int], tol: float = 1e-3) -> GridRelation:
    """How a segment's labelmap grid (``seg_ijk_to_ras``, 4x4; ``seg_content_extent``: the
    i0,i1,j0,j1,k0,k1 extent of its non-empty voxels) relates to the volume's grid."""
    if seg_content_extent is None or seg_content_extent[1] < seg_content_extent[0]:
        return GridRelation("empty")
    seg_m, vol_m = np.asarray(seg_ijk_to_ras, float), np.asarray(volume_ijk_to_ras, float)
    ijk = (np.linalg.inv(vol_m) @ seg_m @ _corners(seg_content_extent).T).T[:, :3]  # in the volume's voxels
    lo, hi = ijk.min(axis=0), ijk.max(axis=0)
    dims = np.asarray(volume_dims, float)
    box_lo, box_hi = np.maximum(lo, -0.5), np.minimum(hi, dims - 0.5)
    inside = float(np.prod(np.clip(box_hi - box_lo, 0, None)))
    total = float(np.prod(np.clip(hi - lo, 1e-9, None)))
    outside = max(0.0, 1.0 - inside / total)
    if outside > 0.01:
        return GridRelation("outside", outside, f"{100 * outside:.0f} % of its extent lies outside the volume")
    same_axes = np.allclose(seg_m[:3, :3], vol_m[:3, :3], atol=tol)
    offset = np.linalg.solve(vol_m[:3, :3], seg_m[:3, 3] - vol_m[:3, 3]) if same_axes else None
    if same_axes and np.allclose(offset, np.round(offset), atol=tol):
        return GridRelation("same")
    return GridRelation("resample", outside, "its voxel grid differs from the volume's: it is resampled onto "
                                              "the volume (nearest voxel) before sending")


@dataclass
class SubmitCheck:
    refuse: str | None = None  # shown instead of sending
    question: str | None = None  # asked (OK / Cancel) before anything is sent
    notes: list = field(default_factory=list)  # added to the status line after the correction is saved


def submit_questions(*, seg_name: str, volume_name: str, made_by_module: bool,
                     seg_volume_id: str | None, volume_id: str, seg_volume_name: str | None,
                     relations: Sequence[GridRelation], transform: str | None = None) -> SubmitCheck:
    """Everything Submit decides on the GUI thread before the job starts (nothing has been sent yet)."""
    refusal = edit_pairing(seg_volume_id, volume_id, seg_name=seg_name, volume_name=volume_name,
                           seg_volume_name=seg_volume_name)
    if refusal:
        return SubmitCheck(refuse=refusal.replace("it is not opened over this CT", "it is not sent as its correction"))
    bad = [r for r in relations if r.kind == "outside"]
    if bad:
        worst = max(bad, key=lambda r: r.outside_fraction)
        return SubmitCheck(refuse=f"{seg_name} does not fit {volume_name}: {worst.detail}. It was drawn on another "
                                  f"image or field of view; nothing was sent.")
    check = SubmitCheck()
    if transform:
        check.notes.append(f"{volume_name} is under the transform '{transform}': the correction was sent in the "
                           f"geometry shown on screen (transform applied).")
    resampled = any(r.kind == "resample" for r in relations)
    if resampled:
        check.notes.append(f"{seg_name} was resampled onto the voxel grid of {volume_name}.")
    if not made_by_module:
        check.question = (f"{seg_name} was not made by Hybrid CT (loaded from a file or drawn by hand).\n\n"
                          f"Send it as the FINAL label of {volume_name}? The server keeps it and retrains on it.")
        if resampled:
            check.question += "\n\nIts voxel grid differs from the volume's: it will be resampled onto the volume."
        check.notes.append(f"{seg_name} was not made by Hybrid CT: sent after confirmation.")
    return check


# ------------------------------------------------------------------------------- cancel
def cancel_message(job_name: str, sent: Sequence[str] = ()) -> str:
    """The status line after Cancel. Cancel stops waiting at once; a request the server already received
    still completes there. ``sent``: what the job's worker had asked the server to do (``Job.sent``), so
    the message says what may already be saved instead of a bare "cancelled"."""
    if sent:
        return (f"{job_name} cancelled — the server may already have {' and '.join(sent)}: check before doing "
                f"it again (Run and Submit of the same scan are safe to repeat).")
    return f"{job_name} cancelled: nothing was sent that changes the server."
