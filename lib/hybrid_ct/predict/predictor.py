"""Whole-volume inference: CT image -> label map in the image's own geometry + a diagnostic report.

One path for the CLI, the MONAI Label app and evaluation: ``check_ct`` -> ``transforms.pre_transforms``
(reorientation, body mask, lung slab, lung window, slice grid) -> the network slice by slice on the lung
slab (inside the energy meter; ``run_volume``) -> ``transforms.post_transforms`` (inverted back to the
input's grid, label, lung components) -> on a whole volume the 3D anatomy rules
(``anatomy.plausible_lungs``) -> label + report, whose scan call, calibration and noise floor come from
``diagnosis``. Slices outside the lung slab are background without running the network, and the 3D
rules run on the lungs' box (``hybrid_ct.processing.crop``): the same label as the network on every slice.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from hybrid_ct.contract import PREDICTED, SEG_HEADS
from hybrid_ct.net.checkpoint import load_checkpoint
from hybrid_ct.processing.crop import grow_slab, margin_slices
from hybrid_ct.processing.scan_call import Calibration, decide, load_calibration, scan_features
from hybrid_ct.processing.context import with_context
from hybrid_ct.net.energy import EnergyMeter
from hybrid_ct.imaging.chest import check_ct
from hybrid_ct.net.network import HybridMultiTaskNet, fold_batchnorm
from hybrid_ct.processing.grid import array_to_image, check_size
from hybrid_ct.processing.burden import infection_burden, severity_grade
from hybrid_ct.processing.density import lung_density, standardise_note
from hybrid_ct.processing.transforms import MIN_3D_SLICES, post_transforms, pre_transforms, run

@dataclass
class SliceOutputs:
    lung: np.ndarray  # [D,1,S,S] probabilities in model space, one field per segmentation head (contract.json)
    infection: np.ndarray
    positive_prob: np.ndarray  # [D]
    predicted: np.ndarray  # [D] class from the firing rates
    rates: np.ndarray  # [D,2]
    ran: np.ndarray | None = None  # [D] bool: slices the network ran on (the others are background)

    @classmethod
    def blank(cls, d: int, size: int) -> "SliceOutputs":
        """``d`` slices on which the network did not run: probability 0, class 0."""
        z = np.zeros((d, 1, size, size), np.float32)
        return cls(**{h: z.copy() for h in SEG_HEADS}, positive_prob=np.zeros(d), predicted=np.zeros(d, np.int64),
                   rates=np.zeros((d, 2)), ran=np.zeros(d, bool))

    def put(self, lo: int, part: "SliceOutputs") -> None:
        hi = lo + len(part.positive_prob)
        for name in (*SEG_HEADS, "positive_prob", "predicted", "rates"):
            getattr(self, name)[lo:hi] = getattr(part, name)
        self.ran[lo:hi] = True

    def filled(self, idx: np.ndarray, n: int) -> "SliceOutputs":
        """Outputs of slices ``idx`` (increasing, first 0, last ``n - 1``) -> ``n`` slices, those between
        interpolated linearly along z (probabilities, firing rates) or taken from the nearest (classes)."""
        pos = np.interp(np.arange(n), idx, np.arange(len(idx)))
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, len(idx) - 1)
        w = pos - i0
        out = {}
        for f in fields(self):
            a = getattr(self, f.name)
            if f.name == "ran" or a is None:
                out[f.name] = None
            elif a.dtype.kind in "iub":
                out[f.name] = a[np.rint(pos).astype(int)]
            else:
                wa = w.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
                out[f.name] = (1 - wa) * a[i0] + wa * a[i1]
        return SliceOutputs(**out)


def thin_slices(n: int, dz_mm: float, z_step_mm: float | None) -> np.ndarray:
    """The slices the network runs on when its slices may be ``z_step_mm`` apart: every k-th (k =
    floor(z_step_mm / dz_mm)) and the last; all ``n`` without a step or when the series is not thinner."""
    k = int(np.floor(float(z_step_mm) / float(dz_mm))) if z_step_mm and dz_mm and dz_mm > 0 else 1
    if k <= 1 or n <= 2:
        return np.arange(n)
    return np.unique(np.append(np.arange(0, n, k), n - 1))


class Predictor:
    """Runs a trained network on CT volumes or slices. Thread-safe for concurrent ``predict`` calls
    only if each thread has its own Predictor (spiking neurons keep per-call state)."""

    def __init__(self, model: HybridMultiTaskNet, meta: dict | None = None, device: str = "cpu",
                 batch_size: int = 8, require_chest: bool = True, progress: bool = False,
                 calibration: Calibration | None = None, crop: bool = True, amp: bool = False,
                 z_step_mm: float | None = None, compile_net: bool = False, compile_cache=None,
                 standardise: bool | float = True):
        self.model = fold_batchnorm(model.to(device).eval())  # same output, one pass less per layer
        self.meta = dict(meta or {})
        self.device = device
        self.batch_size = batch_size
        self.require_chest = require_chest
        self.progress = progress
        self.calibration = calibration or Calibration()
        self.crop = crop  # False: the network on every slice (the reference path of the tests)
        # fp16 autocast on CUDA only (on this CPU bf16/fp16 is ~150x slower, STACK.md); off by default
        # until its labels are measured against fp32 on a GPU (tests/test_gpu.py does that where one exists)
        self.amp = bool(amp) and str(device).startswith("cuda")
        # None: the network on every slice. A thin series (1 mm) read at about its 2.5D context (5 mm)
        # repeats nearly the same slice: the network runs on slices z_step_mm apart, the rest interpolated
        self.z_step_mm = z_step_mm
        self.slices_interpolated = 0  # of the last volume
        # False: the scan's HU as they are (the benchmark's "before"); a number: another reference level
        self.standardise = standardise if isinstance(standardise, bool) else float(standardise)
        # compile_net: the slices run through a torch.compile'd copy that returns its own spike counts
        # (hybrid_ct.net.compiled; the energy report counts them), compiled here, once, not in a request;
        # compile_cache: inductor's on-disk cache folder (from_checkpoint: one per checkpoint sha256)
        self.compiled, self.compile_error = None, None
        if compile_net:
            self.compile_network(compile_cache)

    def compile_network(self, cache_dir=None) -> bool:
        """Build and warm up the compiled copy of the network (minutes on a cold cache). Calls of
        ``run_slices`` made meanwhile (another thread) run the eager network; each batch after it runs the
        compiled one. A failure (e.g. no C++ compiler for inductor) is logged, kept in ``compile_error``,
        and the eager network stays. -> whether the compiled network is in use."""
        from hybrid_ct.net.compiled import CompiledNet

        try:
            compiled = CompiledNet(self.model, self.batch_size, cache_dir=cache_dir)
            compiled.warm_up(self.model.cfg.in_channels, self.model.cfg.in_size, self.device)
        except Exception as e:  # noqa: BLE001 - whatever inductor raises: serve the eager network
            msg = str(e).strip()
            self.compile_error = f"{type(e).__name__}: {msg.splitlines()[0][:300] if msg else ''}"
            logging.getLogger(__name__).warning("torch.compile failed, running the eager network: %s",
                                                self.compile_error)
            return False
        self.compiled = compiled
        return True

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", **kw) -> "Predictor":
        model, meta = load_checkpoint(path, device)
        kw.setdefault("calibration", load_calibration(path))
        if kw.get("compile_net") and kw.get("compile_cache") is None:
            from hybrid_ct.files import file_sha256
            from hybrid_ct.net.compiled import compile_cache_dir

            kw["compile_cache"] = compile_cache_dir(file_sha256(path))
        return cls(model, meta, device=device, **kw)

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unversioned"))

    @torch.no_grad()
    def run_slices(self, x: np.ndarray, meter: EnergyMeter | None = None) -> SliceOutputs:
        """x [D,1,S,S] in [0,1] (or the network's [D,3,S,S] 2.5D input, ``hybrid_ct.processing.context``; a 1-channel
        stack is read as pictures, each its own neighbour) -> per-slice probabilities and class calls."""
        x = with_context(x, self.model.cfg.in_channels)
        outs = {k: [] for k in (*SEG_HEADS, "prob", "pred", "rates")}
        heads = self.model.cfg.heads
        steps = range(0, len(x), self.batch_size)
        for i in tqdm(steps, desc="slices", unit="batch", disable=not self.progress):
            xb = torch.from_numpy(x[i:i + self.batch_size]).to(self.device, non_blocking=True)
            compiled = self.compiled  # may be set by another thread (compile_network) between two batches
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                if compiled is None:
                    o = self.model(xb)  # the meter's hooks count it
                else:
                    o, calls = compiled(xb)  # the compiled copy counts its own spikes
                    if meter is not None:
                        meter.add_counts(len(xb), calls)
            o = {k: v.float() if torch.is_tensor(v) else v for k, v in o.items()}
            for h in SEG_HEADS:
                p = torch.sigmoid(o[h]) if h in heads else torch.zeros_like(xb[:, :1])
                outs[h].append(p.cpu().numpy())
            if "cls" in heads:
                outs["prob"].append(self.model.positive_probability(o).cpu().numpy())
                outs["pred"].append(self.model.predicted_class(o).cpu().numpy())
                outs["rates"].append(o["cls_rates"].cpu().numpy())
        cat = {k: np.concatenate(v) if v else np.zeros((len(x),) if k != "rates" else (len(x), 2)) for k, v in outs.items()}
        return SliceOutputs(**{h: cat[h] for h in SEG_HEADS}, positive_prob=cat["prob"], predicted=cat["pred"],
                            rates=cat["rates"])

    def run_volume(self, data: dict, meter: EnergyMeter | None = None) -> SliceOutputs:
        """The network on the model slices of ``data`` (``pre_transforms``' output). With ``crop`` and a
        lung slab (``data["slab"]``, ``transforms.LungSlabd``) only on the slab, widened while the
        network still outlines lung on an edge slice (``crop.grow_slab``: lung that is not aerated, at a
        dense base, is followed); every other slice is background. The network reads one slice at a
        time, so the slab's slices come out as on the whole volume (tests/test_crop.py)."""
        x = data["image"].as_tensor().numpy()
        d = len(x)
        # the 2.5D input from the whole stack, before any slab is cut: the slab's edge slices see their neighbours
        x = with_context(x, self.model.cfg.in_channels, data["image"].meta["canon_spacing"][0], self.model.cfg.context_mm)
        dz = data["image"].meta["canon_spacing"][0]
        slab = data.get("slab") if self.crop else None
        if slab is None or tuple(slab) == (0, d):
            so = self._run_part(x, dz, meter)
            so.ran = np.ones(d, bool)
            return so
        lo, hi = (int(v) for v in slab)
        step = margin_slices(dz)
        so = SliceOutputs.blank(d, x.shape[-1])
        so.put(lo, self._run_part(x[lo:hi], dz, meter))
        while True:
            nlo, nhi = grow_slab((so.lung[:, 0] > 0.5).sum(axis=(1, 2)), lo, hi, d, step)
            if (nlo, nhi) == (lo, hi):
                return so
            if nlo < lo:
                so.put(nlo, self._run_part(x[nlo:lo], dz, meter))
            if nhi > hi:
                so.put(hi, self._run_part(x[hi:nhi], dz, meter))
            lo, hi = nlo, nhi

    def _run_part(self, x: np.ndarray, dz_mm: float, meter: EnergyMeter | None) -> SliceOutputs:
        """``run_slices`` on a run of consecutive slices, or with ``z_step_mm`` on ``thin_slices`` of it."""
        idx = thin_slices(len(x), dz_mm, self.z_step_mm)
        if len(idx) == len(x):
            return self.run_slices(x, meter)
        self.slices_interpolated += len(x) - len(idx)
        return self.run_slices(x[idx], meter).filled(idx, len(x))

    def predict(self, image: sitk.Image, size: int | None = None):
        """-> (label image, uint8 in the input's geometry; report dict, see docs/CONTRACTS.md)."""
        t0 = time.perf_counter()
        check_ct(image, require_chest=self.require_chest)
        pre = pre_transforms(check_size(size or self.model.cfg.in_size), standardise=self.standardise,
                             **self.model.cfg.input_spec())
        data = run(pre, {"image": image, "hu": image})  # "hu": the input as it is, for the 3D rules of the post chain
        self.slices_interpolated = 0
        with EnergyMeter(self.model) as meter:
            so = self.run_volume(data, meter)
        data["pred"] = np.concatenate([getattr(so, h) for h in SEG_HEADS], axis=1)  # ProbsToLabeld's channel order
        label_arr = run(post_transforms(pre), data)["label"]
        label = array_to_image(label_arr, image)
        # a whole volume in HU: the parenchyma's density (a picture's grey values are not HU)
        hu = sitk.GetArrayViewFromImage(image) if label_arr.shape[0] >= MIN_3D_SLICES else None
        report = self._report(label, label_arr, so, meter, time.perf_counter() - t0, hu, data.get("density"))
        return label, report

    def _report(self, label: sitk.Image, label_arr: np.ndarray, so: SliceOutputs, meter: EnergyMeter,
                latency: float, hu: np.ndarray | None = None, standardised: dict | None = None) -> dict:
        features = scan_features(label_arr, label.GetSpacing(), so.positive_prob, (so.lung[:, 0] > 0.5).sum(axis=(1, 2)))
        call = decide(features, self.calibration)
        ran = so.ran if so.ran is not None else np.ones(len(so.rates), bool)
        burden = infection_burden(label)
        energy = meter.report()
        density = lung_density(hu, label_arr) if hu is not None else None  # the report's guard on expiration / free-breathing scans
        if density is not None and standardised:  # what the pre chain's StandardiseDensityd did (processing.density)
            density.update(level_hu=standardised["level_hu"], shift_hu=standardised["shift_hu"],
                           note=standardise_note(standardised["shift_hu"]))
        return {
            "classification": {
                **call,
                "firing_rates": so.rates[ran].mean(0).tolist() if ran.any() else [0.0, 0.0],
                "slice_positive": so.predicted.astype(int).tolist(),
                "slice_probability": [round(float(p), 4) for p in so.positive_prob],
            },
            "burden": burden,
            "grade": severity_grade(burden["total_pct"]) if call["infection_found"] else "CT-0",
            "energy": energy.summary(),
            "latency_s": latency,
            "slices_run": int(ran.sum()) - self.slices_interpolated,  # the network's; the energy counts these
            "slices_interpolated": self.slices_interpolated,
            "model_version": self.version,
            "label_names": dict(PREDICTED),
            "lung_density": density,
        }


def run_on_slices(predictor, s, meter=None):
    """Outputs of ``predictor`` (the product's slice path) for a SliceSet."""
    return predictor.run_slices(s.inputs(channels=predictor.model.cfg.in_channels), meter)


def energy_on_slices(model, s, n: int = 96):
    """EnergyReport of ``model`` (its inference copy, as served) on the first ``n`` slices of SliceSet ``s``."""

    predictor = Predictor(model, progress=False)
    with EnergyMeter(predictor.model) as meter:
        run_on_slices(predictor, s.subset(np.arange(min(n, len(s)))), meter)
    return meter.report()
