"""What the trainer draws: augmentations (MONAI transforms) and the slice dataset that applies them."""
from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (Compose, MapTransform, RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised,
                              RandGaussianSmoothd, RandomizableTransform, RandRotate90d, RandScaleIntensityd,
                              RandSimulateLowResolutiond)
from torch.utils.data import Dataset

from hybrid_ct.contract import SEG_HEADS
from hybrid_ct.data.lesions import lesion_slice
from hybrid_ct.data.manifest import group_family
from hybrid_ct.data.protocol import protocol_slice
from hybrid_ct.data.slice_store import MISSING, SliceSet
from hybrid_ct.processing.context import with_context
import copy


def augmentations(style: bool = False) -> Compose:
    """Label-preserving augmentation (monai dictionary transforms); ``style`` adds the looks that tell
    picture sources apart -- gamma, contrast, blur, noise, lower resolution, JPEG re-compression -- so
    the network cannot learn a source from its look."""
    keys = ["image", *SEG_HEADS]  # the image and one mask per segmentation head
    geometric = [
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandAffined(keys, prob=0.5, rotate_range=0.15, scale_range=0.1, translate_range=8,
                    mode=["bilinear"] + ["nearest"] * len(SEG_HEADS), padding_mode="zeros"),
        RandScaleIntensityd("image", factors=0.1, prob=0.3),
        RandGaussianNoised("image", prob=0.2, std=0.02),
    ]
    if not style:
        return Compose(geometric)
    return Compose(geometric + [
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
        RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
        RandSimulateLowResolutiond("image", prob=0.2, zoom_range=(0.5, 0.9), upsample_mode="bilinear"),
        RandJpegd("image", prob=0.2, quality=(30, 90)),
    ])


class RandJpegd(RandomizableTransform, MapTransform):
    """JPEG re-compression of the [0, 1] image at a random quality (monai has no JPEG transform; the
    published picture collections differ in how hard they were compressed)."""

    def __init__(self, keys, prob: float = 0.2, quality=(30, 90)):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.quality = quality

    def __call__(self, data):
        from io import BytesIO

        from PIL import Image

        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        q = int(self.R.randint(self.quality[0], self.quality[1] + 1))
        for k in self.key_iterator(d):
            x = np.asarray(d[k], dtype=np.float32)
            out = []
            for c in x:  # each channel (the 2.5D input has three) compressed as its own grey picture
                buf = BytesIO()
                Image.fromarray(np.round(np.clip(c, 0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=q)
                out.append(np.asarray(Image.open(BytesIO(buf.getvalue())), dtype=np.float32) / 255.0)
            d[k] = torch.from_numpy(np.stack(out))
        return d


PICTURE_ROTATION = Compose([RandRotate90d(["image", *SEG_HEADS], prob=0.75, max_k=3),
                            RandFlipd(["image", *SEG_HEADS], prob=0.25, spatial_axis=0)])


KNOWN_ORIENTATION = ("phantom", "imlab", "wholescan")  # HU volumes keep their known orientation
# where synthetic lesions and protocol variation go: HU volumes of infection-free lungs with a lung
# mask. Not Ma Jun's slices ("majun20"): they come from COVID-19 patients whose real lesions have no mask.
HU_FAMILIES = ("phantom", "imlab", "wholescan")
MIN_SYNTH_LUNG = 0.02  # a slice gets a lesion from this share of lung pixels on (not the apex or the domes' tips)


class SliceDataset(Dataset):
    """Model-space slices as training samples. ``rotate_pictures``: 2D pictures (every group family not in
    ``KNOWN_ORIENTATION``) are also turned by 90/180/270 degrees and flipped, as collections publish them.
    ``synth_lesions``: the share of infection-free HU slices with a lung mask (``HU_FAMILIES``) that get a
    synthetic lesion (``data.lesions``) and its mask, and so become positive; ``protocol_aug``: the share of
    HU slices shown under a random scan protocol (``data.protocol``). Both draw from a generator of their own:
    at 0 nothing is drawn and the samples are those of before."""

    def __init__(self, data: SliceSet, augment: bool = False, style: bool = False, rotate_pictures: bool = False,
                 seed: int | None = None, channels: int = 1, context_dropout: float = 0.0,
                 synth_lesions: float = 0.0, protocol_aug: float = 0.0):
        self.data = data
        self.channels = channels  # 3: the 2.5D input (SliceSet.inputs); augmentation moves all channels alike
        # share of volume slices shown without their neighbours (as a picture): the context channels then stop
        # telling a volume (here: mostly infection-free whole scans) from a picture (the infection masks)
        self.context_dropout = float(context_dropout) if augment else 0.0
        self._rng = np.random.default_rng(seed)
        self.aug = augmentations(style) if augment else None
        self.synth_lesions = float(synth_lesions) if augment else 0.0
        self.protocol_aug = float(protocol_aug) if augment else 0.0
        self._synth_rng = np.random.default_rng(None if seed is None else [seed, 27])
        self.rotate = copy.deepcopy(PICTURE_ROTATION) if augment and rotate_pictures else None
        if seed is not None:
            for t in (self.aug, self.rotate):
                if t is not None:
                    t.set_random_state(seed)

    def __len__(self):
        return len(self.data)

    def _input(self, i) -> np.ndarray:
        if self.channels == 3 and self.context_dropout and self._rng.random() < self.context_dropout:
            return with_context(self.data.inputs(i, 1), 3)[0]
        return self.data.inputs(i, self.channels)[0]

    def __getitem__(self, i):
        d = self.data
        lung, inf = d.lung[i], d.infection[i]
        has_lung, has_inf = bool(lung[0, 0] != MISSING), bool(inf[0, 0] != MISSING)
        image, infection, cls = self._input(i), (inf == 1), int(d.cls[i])
        if (self.synth_lesions or self.protocol_aug) and group_family(d.group[i]) in HU_FAMILIES:
            image, infection, cls, has_inf = self._issue27(i, image, lung, infection, cls, has_lung, has_inf)
        s = {
            "image": torch.from_numpy(image),
            "lung": torch.from_numpy((lung[None] == 1).astype(np.float32)),
            "infection": torch.from_numpy(infection[None].astype(np.float32)),
        }
        if self.rotate is not None and str(d.group[i]).split("_", 1)[0] not in KNOWN_ORIENTATION:
            s = self.rotate(s)
        if self.aug is not None:
            s = self.aug(s)
        if self.aug is not None or self.rotate is not None:
            s = {k: torch.as_tensor(np.ascontiguousarray(np.asarray(v)), dtype=torch.float32) for k, v in s.items()}
        s["cls"] = torch.tensor(max(cls, 0))
        s["cls_mask"] = torch.tensor(cls >= 0)
        s["lung_mask"] = torch.tensor(has_lung)
        s["infection_mask"] = torch.tensor(has_inf)
        return s

    def _issue27(self, i, image, lung, infection, cls, has_lung, has_inf):
        """A synthetic lesion (infection-free slices with a lung mask) and a random scan protocol."""
        rng, lung_b = self._synth_rng, lung == 1
        if self.synth_lesions and has_lung and cls != 1 and not infection.any() \
                and lung_b.mean() >= MIN_SYNTH_LUNG and rng.random() < self.synth_lesions:
            image, mask = lesion_slice(image, lung_b, rng)
            if mask.any():
                infection, cls, has_inf = mask.astype(bool), 1, True
        if self.protocol_aug and rng.random() < self.protocol_aug:
            nb = self.data.context[i].astype(np.float32) / 255.0 if self.data.context is not None else None
            image = protocol_slice(image, lung_b if has_lung else None, rng, nb,
                                   px_mm=350.0 / image.shape[-1]).astype(np.float32)
        return np.ascontiguousarray(image, dtype=np.float32), infection, cls, has_inf
