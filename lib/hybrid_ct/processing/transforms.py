"""Pre- and post-processing as MONAI dictionary transforms: one chain for the CLI, the app and the trainer.

``pre_transforms(size)`` (inference: key ``image``; training adds ``label``)::
    SitkToTensord -> OrientToCanonicald* -> BodyMaskd -> StandardiseDensityd -> LungSlabd -> LungWindowd -> ToSliceGridd*

(``fov="lungs"`` adds LungBoxd before LungWindowd, and BodyMaskd in training too; StandardiseDensityd runs in
training too and is a no-op on every HU volume the shipped model trained on, ``processing.density``.)

``post_transforms(pre)`` (the network's probabilities under ``pred``, [D, 2, S, S])::
    EnsureTyped -> Invertd(pre) -> ProbsToLabeld -> KeepLungComponentsd -> PlausibleLungsd -> LungSidesd

(``LungSidesd`` is the derived head ``lung_sides`` of contract.json: right / left lung, geometric, not learned.)

(* invertible; ``Invertd`` runs their inverses, newest first, on ``pred`` and on ``body``.)

Layout: a volume is a MetaTensor [C, z, y, x] in SimpleITK's array (numpy) order, not the [C, x, y, z]
of MONAI's ITK reader, so arrays and SimpleITK images convert without a transpose; its geometry stays
in ``meta`` (``spacing`` / ``origin`` / ``direction``, SimpleITK order). After ``ToSliceGridd`` the image
is [D, 1, S, S]: the axial slices are the batch of the 2D network. The arithmetic of every step is in
``hybrid_ct.processing.grid`` (the array-level functions there use the same functions).

Precision: the chain gives training and inference the same float32 slices, but training then stores
them as uint8 (``training.SliceSet``, x * 255 rounded) and the network trains on that 8-bit copy, while
inference feeds float32. Measured with the shipped model (pretrained.pt), float32 vs the 8-bit copy:
COVID-CT-MD P001 0.31 % of voxels differ (burden 1.49 vs 1.43 %, grade CT-1 both, 6 of 148 slice
calls, scan probability 0.993 both); the MedSeg picture 0.jpg 2.9 % (burden 48.8 vs 48.2 %, grade and
slice call equal). Inference stays float32 (the shipped model's outputs are unchanged).
"""
from __future__ import annotations

from copy import deepcopy

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, Invertd, MapTransform, ScaleIntensityRanged
from monai.transforms.inverse import InvertibleTransform
from monai.utils import TraceKeys

from hybrid_ct.errors import InputError
from hybrid_ct.processing.grid import FOVS, LUNG_MARGIN_MM, SliceContext, WINDOW_HU, box_pad, make_context, canon_to_grid, check_size, from_canonical, grid_to_canon, \
    orientation, square_pad, to_canonical
from hybrid_ct.imaging.body import BODY_HU, body_mask
from hybrid_ct.processing.postprocess import mask_label
from hybrid_ct.processing.crop import MIN_SLAB_SLICES, lung_air_box, lung_slab
from hybrid_ct.processing.density import TRAINING_MAX_LEVEL_HU, parenchyma_level, standardise, standardise_shift
from hybrid_ct.processing.anatomy import plausible_lungs
from hybrid_ct.processing.postprocess import keep_lung_components
from hybrid_ct.processing.sides import lung_sides

MIN_3D_SLICES = 8  # from this many slices on, a volume gets the 3D anatomy rules (PlausibleLungsd)


def _np(x) -> np.ndarray:
    return x.as_tensor().detach().cpu().numpy() if isinstance(x, MetaTensor) else np.asarray(x)


def _like(arr: np.ndarray, ref: MetaTensor) -> MetaTensor:
    """``arr`` as a MetaTensor that carries ``ref``'s meta data and applied operations."""
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(arr)), meta=ref.meta,
                      applied_operations=ref.applied_operations)


def run(transforms, data: dict) -> dict:
    """Apply a chain; an InputError inside it comes out as itself (MONAI wraps errors in RuntimeError)."""
    try:
        return transforms(data)
    except RuntimeError as e:
        cause = e
        while cause is not None and not isinstance(cause, InputError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


class SitkToTensord(MapTransform):
    """SimpleITK image -> float32 MetaTensor [1, z, y, x] with its geometry in ``meta``."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, sitk.Image) or img.GetDimension() != 3:
                raise InputError(f"{key}: expected a 3D SimpleITK image")
            arr = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)[None]
            d[key] = MetaTensor(torch.from_numpy(arr), meta={
                "spacing": img.GetSpacing(), "origin": img.GetOrigin(), "direction": img.GetDirection()})
        return d


class _Invertible(MapTransform, InvertibleTransform):
    """``inverse``: pops this transform's record from each key and applies ``undo`` to the array."""

    def inverse(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            d[key] = _like(self.undo(_np(x), self.pop_transform(x)[TraceKeys.EXTRA_INFO]), x)
        return d

    def undo(self, arr: np.ndarray, info: dict) -> np.ndarray:
        raise NotImplementedError


class OrientToCanonicald(_Invertible):
    """Reorient to LPS axial slices (``preprocess.orientation``; oblique is snapped to the nearest axes).
    Every key takes the orientation of ``ref_key`` (a label follows its image). Custom rather than
    ``Orientationd``: that works on MONAI's RAS affine of [C, x, y, z] arrays and settles oblique axes its
    own way; this keeps the axis choice the shipped model was trained with. The only reorientation."""

    def __init__(self, keys=("image", "label", "body"), ref_key: str = "image", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data):
        d = dict(data)
        ref = d[self.ref_key]
        perm, flips = orientation(ref.meta["direction"])
        sp_zyx = tuple(reversed(ref.meta["spacing"]))
        for key in self.key_iterator(d):
            x = d[key]
            if tuple(x.shape[1:]) != tuple(ref.shape[1:]):
                raise InputError(f"{key} size {tuple(reversed(x.shape[1:]))} does not match the image size "
                                 f"{tuple(reversed(ref.shape[1:]))}")
            out = _like(to_canonical(_np(x), perm, flips), x)
            out.meta["canon_spacing"] = tuple(float(sp_zyx[p]) for p in perm)
            self.push_transform(out, extra_info={"perm": perm, "flips": flips})
            d[key] = out
        return d

    def undo(self, arr, info):
        return from_canonical(arr, info["perm"], info["flips"])


class _Derived(MapTransform):
    """Writes ``derive`` of its key's value under ``out_key`` (the key itself is kept)."""

    def __init__(self, keys, out_key: str):
        super().__init__(keys)
        self.out_key = out_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.out_key] = self.derive(d[key])
        return d

    def derive(self, x):
        raise NotImplementedError


class BodyMaskd(_Derived):
    """The patient's body in the canonical frame -> ``out_key`` (bool [1, D, H, W]), for the body rule of
    ``KeepLungComponentsd``. The chest check keeps its own body (``lung_air_fraction``, not opened): this
    opened mask lost the lungs of cap001, cropped to the body (air share 0.066 against 0.381), and would put a
    real chest next to the 0.05 refusal line. Custom: ``imaging.body.body_mask``
    (largest region above ``threshold``, holes filled), on the already canonical HU volume (so its own LPS
    reorientation is a no-op); it takes this key's applied operations, so ``Invertd`` brings it back to the
    input's layout with the image's own reorientation."""

    def __init__(self, keys="image", out_key: str = "body", threshold: float = BODY_HU):
        super().__init__(keys, out_key)
        self.threshold = float(threshold)

    def derive(self, x):
        canon = sitk.GetImageFromArray(_np(x)[0])  # identity direction: LPS
        canon.SetSpacing(tuple(reversed(x.meta["canon_spacing"])))
        return MetaTensor(torch.from_numpy(body_mask(canon, self.threshold)[None]), meta=deepcopy(x.meta),
                          applied_operations=deepcopy(x.applied_operations))


class _LungAird(MapTransform):
    """Writes ``measure(hu, body, spacing)`` of the canonical HU volume (``crop``'s large air components
    inside ``body_key``'s body, at low resolution) under ``out_key``. Custom: a few milliseconds, before
    the lung window."""

    out_default = ""

    def __init__(self, keys="image", body_key: str = "body", out_key: str | None = None, air_hu: float = BODY_HU):
        super().__init__(keys)
        self.body_key, self.out_key, self.air_hu = body_key, out_key or self.out_default, float(air_hu)

    def __call__(self, data):
        d = dict(data)
        body = d.get(self.body_key)
        for key in self.key_iterator(d):
            x = d[key]
            d[self.out_key] = self.measure(_np(x)[0], _np(body)[0].astype(bool) if body is not None else None,
                                           x.meta["canon_spacing"], self.air_hu)
        return d

    @staticmethod
    def measure(hu, body, spacing, air_hu):
        raise NotImplementedError


class LungSlabd(_LungAird):
    """The slices that hold the lungs (``crop.lung_slab``, plus a margin) -> ``(z0, z1)`` on the canonical
    slice axis (which ``ToSliceGridd`` keeps), or None (run every slice). ``Predictor`` runs the network on
    these slices only."""

    out_default = "slab"

    @staticmethod
    def measure(hu, body, spacing, air_hu):
        return lung_slab(hu, body, spacing, air_hu)


class LungBoxd(_LungAird):
    """The in-plane box around the lungs' air over all slices (``crop.lung_air_box``) -> (y0, y1, x0, x1)
    or None: the field of view ``fov="lungs"`` of ``ToSliceGridd``."""

    out_default = "lung_box"

    @staticmethod
    def measure(hu, body, spacing, air_hu):
        return lung_air_box(hu, body, spacing, air_hu)


class StandardiseDensityd(MapTransform):
    """A whole HU volume whose lung parenchyma is denser than the densest HU training volume (an expiration
    or free-breathing scan) mapped back to that level (``processing.density.standardise``); the level and the
    shift go under ``out_key`` (``{"level_hu", "shift_hu"}``, for the report). Training and inference alike (a
    model retrained on corrections sees what it will be served). The body is ``body_key``'s mask, or found
    here (``BodyMaskd``'s) when the chain has none. Pictures and short stacks (fewer than
    ``MIN_SLAB_SLICES`` slices: their grey values need not be HU) and scans at or below the level pass
    unchanged. Custom: a histogram mode and one ``np.interp``."""

    def __init__(self, keys="image", body_key: str = "body", out_key: str = "density", body_hu: float = BODY_HU,
                 reference: float = TRAINING_MAX_LEVEL_HU):
        super().__init__(keys)
        self.body_key, self.out_key, self.body_hu, self.reference = body_key, out_key, float(body_hu), float(reference)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            hu = _np(x)[0]
            level = None
            if hu.shape[0] >= MIN_SLAB_SLICES:
                body = d.get(self.body_key)
                body = BodyMaskd(key, threshold=self.body_hu).derive(x) if body is None else body
                level = parenchyma_level(hu, _np(body)[0])
            shift = standardise_shift(level, self.reference)
            d[self.out_key] = {"level_hu": level, "shift_hu": shift}
            if shift > 0:
                d[key] = _like(standardise(hu, level, shift)[None], x)
        return d


class LungWindowd(ScaleIntensityRanged):
    """The lung window (W1500 / L-600): ``WINDOW_HU`` onto [0, 1], clipped; the same float32 values as
    ``preprocess.window`` (tests/test_transforms.py checks it)."""

    def __init__(self, keys="image", window_hu=WINDOW_HU):
        super().__init__(keys, a_min=float(window_hu[0]), a_max=float(window_hu[1]), b_min=0.0, b_max=1.0, clip=True)


class ToSliceGridd(_Invertible):
    """Canonical [1, D, H, W] -> axial slices [D, 1, size, size]: padded with 0 (the window minimum,
    background for labels) to a square field of view of ``ref_key`` (``preprocess.square_pad``; with
    ``fov="lungs"`` the square around ``box_key``'s lung box, ``preprocess.box_pad``), then
    resized, "bilinear" (antialiased when shrinking, clipped to ``value_range``) or "nearest". The inverse
    takes [D, C, size, size] back to [C, D, H, W] on the canonical grid (bilinear unless this key was
    nearest or ``Invertd(nearest_interp=True)``). Custom: MONAI's ``Resized`` resizes one image; this
    pads each slice of the volume to the square field of view and keeps the pad for the way back."""

    def __init__(self, keys=("image", "label"), size: int = 256, mode=("bilinear", "nearest"),
                 ref_key: str = "image", value_range=(0.0, 1.0), allow_missing_keys: bool = True,
                 fov: str = "square", box_key: str = "lung_box", margin_mm: float = LUNG_MARGIN_MM):
        super().__init__(keys, allow_missing_keys)
        if fov not in FOVS:
            raise InputError(f"fov must be one of {FOVS}, got {fov!r}")
        self.size = check_size(size)
        self.mode = (mode,) * len(self.keys) if isinstance(mode, str) else tuple(mode)
        self.ref_key, self.value_range, self.fov, self.box_key = ref_key, value_range, fov, box_key
        self.margin_mm = float(margin_mm)

    def __call__(self, data):
        d = dict(data)
        ref = d[self.ref_key]
        canon_shape = tuple(ref.shape[1:])
        if self.fov == "lungs":
            pad = box_pad(d.get(self.box_key), canon_shape, ref.meta["canon_spacing"], self.margin_mm)
        else:
            pad = square_pad(canon_shape, ref.meta["canon_spacing"])
        for key, mode in self.key_iterator(d, self.mode):
            x = d[key]
            grid = canon_to_grid(_np(x)[0], pad, self.size, fill=0.0, mode=mode)
            if mode == "nearest":
                np.rint(grid, out=grid)
            elif self.value_range is not None:
                np.clip(grid, *self.value_range, out=grid)
            out = _like(grid, x)
            self.push_transform(out, extra_info={"pad": pad, "canon_shape": canon_shape, "size": self.size,
                                                 "mode": mode})
            d[key] = out
        return d

    def undo(self, arr, info):
        mode = "nearest" if info["mode"] == "nearest" else "bilinear"
        return grid_to_canon(arr, info["pad"], tuple(info["canon_shape"]), info["size"], mode)


def grid_record(x: MetaTensor) -> dict:
    """The geometry ``ToSliceGridd`` recorded on ``x`` (pad, canon_shape, size, mode)."""
    for op in reversed(x.applied_operations):
        if op.get(TraceKeys.CLASS_NAME) == ToSliceGridd.__name__:
            return op[TraceKeys.EXTRA_INFO]
    raise InputError("no ToSliceGridd record on this tensor")


class ProbsToLabeld(_Derived):
    """Probabilities [2, z, y, x] (lung, infection) -> uint8 label [z, y, x] under ``out_key``: 1 lung (no side yet),
    2 infection inside the lung. Custom: the rule is ``inference.mask_label`` (a threshold at 0.5 each and
    infection only inside lung), not an argmax over classes."""

    def __init__(self, keys="pred", out_key: str = "label"):
        super().__init__(keys, out_key)

    def derive(self, x):
        p = _np(x)
        return mask_label(p[0], p[1])


class PlausibleLungsd(MapTransform):
    """The 3D anatomy rules on a whole volume's label (``anatomy.plausible_lungs``: gas under the
    diaphragm and air outside the body are not lung), from the input's own HU image under ``hu_key`` (a
    SimpleITK image, untouched by the pre chain) and the body mask; a stack under ``min_slices`` slices is
    left as it is. Custom: the rules need the HU volume and patient geometry, which no MONAI transform reads."""

    def __init__(self, keys="label", hu_key: str = "hu", body_key: str = "body", min_slices: int = MIN_3D_SLICES):
        super().__init__(keys)
        self.hu_key, self.body_key, self.min_slices = hu_key, body_key, int(min_slices)

    def __call__(self, data):
        d = dict(data)
        hu = d.get(self.hu_key)
        if hu is None:
            return d
        body = d.get(self.body_key)
        body = _np(body)[0].astype(bool) if body is not None else None
        for key in self.key_iterator(d):
            label = np.asarray(d[key])
            if label.shape[0] >= self.min_slices:
                d[key] = plausible_lungs(label, sitk.GetArrayViewFromImage(hu), hu.GetSpacing(), hu.GetDirection(),
                                         hu.GetOrigin(), body=body)
        return d


class KeepLungComponentsd(MapTransform):
    """Drop predicted lung that cannot be lung (small components, air outside ``body_key``'s body).
    Custom: a thin wrapper of ``inference.keep_lung_components`` (the rules live there)."""

    def __init__(self, keys="label", body_key: str = "body"):
        super().__init__(keys)
        self.body_key = body_key

    def __call__(self, data):
        d = dict(data)
        body = d.get(self.body_key)
        body = _np(body)[0].astype(bool) if body is not None else None
        for key in self.key_iterator(d):
            d[key] = keep_lung_components(np.asarray(d[key]), body=body)
        return d


class LungSidesd(MapTransform):
    """The derived head ``lung_sides``: the label's unsided lung becomes right / left lung
    (``sides.lung_sides``), sides from the patient geometry of the SimpleITK image under ``ref_key`` (the
    input; without it the x index is taken to increase towards the patient's left). Custom: a rule on the
    patient's geometry after the network, which no MONAI transform expresses."""

    def __init__(self, keys="label", ref_key: str = "hu"):
        super().__init__(keys)
        self.ref_key = ref_key

    def __call__(self, data):
        d = dict(data)
        ref = d.get(self.ref_key)
        for key in self.key_iterator(d):
            d[key] = lung_sides(np.asarray(d[key]), ref if isinstance(ref, sitk.Image) else None)
        return d


def pre_transforms(size: int, keys=("image",), body: bool = True, fov: str = "square", window_hu=WINDOW_HU,
                   margin_mm: float = LUNG_MARGIN_MM, body_hu: float = BODY_HU, standardise: bool | float = True) -> Compose:
    """SimpleITK images under ``keys`` ("image" first; "label" for training) -> model slices.
    ``body``: also the body mask for the post-processing and the lung slab (inference only).
    ``standardise``: the density standardisation (``StandardiseDensityd``), training and inference; off only
    to measure what it does (``Predictor(standardise=False)``); a number: that reference level instead of the
    contract's (a measured alternative, ``protocol_variants.py --reference-hu``).
    ``fov``: the field of view (``grid.FOVS``; "lungs" needs the body mask and the lung box, training
    too). ``fov``, ``window_hu``, ``margin_mm`` and ``body_hu`` define what the network sees: pass a
    checkpoint's own (``NetConfig.input_spec()``); the defaults are those every model so far was built with."""
    keys = tuple(keys)
    chain = [SitkToTensord(keys), OrientToCanonicald(keys + ("body",) if body else keys)]
    if body or fov == "lungs":
        chain += [BodyMaskd("image", threshold=body_hu)]
    if standardise is not False:
        ref = TRAINING_MAX_LEVEL_HU if standardise is True else float(standardise)
        chain += [StandardiseDensityd("image", body_hu=body_hu, reference=ref)]
    if body:
        chain += [LungSlabd("image", air_hu=body_hu)]
    if fov == "lungs":
        chain += [LungBoxd("image", air_hu=body_hu)]
    chain += [LungWindowd("image", window_hu),
              ToSliceGridd(keys, size, mode=tuple("bilinear" if k == "image" else "nearest" for k in keys),
                           fov=fov, margin_mm=margin_mm)]
    return Compose(chain)


def inverse_transforms(pre: Compose) -> Invertd:
    """Probabilities ``pred`` [D, C, S, S] (and the ``body`` mask) back to the input's own grid and layout,
    bilinear, by the inverses of ``pre``."""
    return Invertd(keys=("pred", "body"), transform=pre, orig_keys=("image", "body"), nearest_interp=False,
                   allow_missing_keys=True)


def post_transforms(pre: Compose) -> Compose:
    """Network probabilities under ``pred`` -> uint8 label [z, y, x] under ``label`` in the input's layout;
    with the input's HU image under ``hu`` (inference on a whole volume) the 3D anatomy rules too."""
    return Compose([EnsureTyped("pred", track_meta=True),  # a MetaTensor, as Invertd expects
                    inverse_transforms(pre), ProbsToLabeld("pred"), KeepLungComponentsd("label"),
                    PlausibleLungsd("label"), LungSidesd("label")])


def input_kwargs(view="square") -> dict:
    """A field of view ("square" / "lungs") or a whole input definition (``NetConfig.input_spec()``) ->
    the keyword arguments of ``pre_transforms`` that define the network's input."""
    return dict(view) if isinstance(view, dict) else {"fov": view}


def model_slices(image: sitk.Image, label: sitk.Image | None, size: int, fov="square"):
    """Training input: ``pre_transforms`` on an image and its label (the label follows the image's
    orientation and grid; nearest neighbour) -> (x float32 [D, 1, size, size] in [0, 1], label uint8
    [D, size, size] or None). ``fov``: a field of view or a network's whole input definition (``input_kwargs``)."""
    keys = ("image", "label") if label is not None else ("image",)
    d = run(pre_transforms(size, keys=keys, body=False, **input_kwargs(fov)), {"image": image, "label": label})
    lab = d["label"].as_tensor().numpy()[:, 0].astype(np.uint8) if label is not None else None
    return d["image"].as_tensor().numpy(), lab


def to_model_slices(img: sitk.Image, size: int = 256, fov="square"):
    """Return ``(x, ctx)``: x is float32 [D, 1, size, size] in [0, 1] (axial LPS slices, lung window),
    from ``transforms.pre_transforms``; ``ctx`` its geometry (with the field of view ``fov`` chose)."""

    ctx = make_context(img, size)
    x = run(pre_transforms(ctx.size, body=False, **input_kwargs(fov)), {"image": img})["image"]
    ctx.pad = tuple(grid_record(x)["pad"])
    return x.as_tensor().numpy(), ctx


def label_to_model_slices(label_img: sitk.Image, ctx_or_size=256) -> np.ndarray:
    """Resample a label map like ``to_model_slices`` (nearest neighbour; a ``SliceContext`` puts it on
    that image's grid); uint8 [D, size, size]."""
    if isinstance(ctx_or_size, SliceContext):
        ctx = ctx_or_size
        if tuple(reversed(label_img.GetSize())) != tuple(ctx.orig_shape):
            raise InputError(f"label size {label_img.GetSize()} does not match the image size "
                             f"{tuple(reversed(ctx.orig_shape))}")
    else:
        ctx = make_context(label_img, int(ctx_or_size))
    canon = to_canonical(sitk.GetArrayViewFromImage(label_img), ctx.perm, ctx.flips)
    out = canon_to_grid(canon, ctx.pad, ctx.size, fill=0.0, mode="nearest")
    return np.rint(out[:, 0]).astype(np.uint8)
