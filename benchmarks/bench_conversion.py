"""ANN-to-SNN conversion: BatchNorm scale k vs firing rate, energy ratio and validation score (not a test).

For each k: the trained CNN twin converted with ``model.from_twin`` (k), BatchNorm statistics re-estimated
(``training.recalibrate_batchnorm``), scored on the recipe's validation curve slices, then fine-tuned for
one epoch of the recipe (200 iterations, the recipe's fine-tuning lr) and scored again. Firing rate and
E_hybrid / E_conv come from ``evaluation.energy_on_slices`` (the first 96 curve slices, as in the recipe's pick).
Same data and split as ``hybrid-ct train --recipe shipped``.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_conversion.py runs/twin.pt 2 3
"""
import sys, time, logging
from dataclasses import replace
import torch
from hybrid_ct.predict.predictor import energy_on_slices
from hybrid_ct.train.recipes import load_recipe, recipe_slices
from hybrid_ct.data.manifest import data_root
from hybrid_ct.net.network import NetConfig, from_twin
from hybrid_ct.net.checkpoint import load_checkpoint
from hybrid_ct.train.config import TrainConfig
from hybrid_ct.train.scoring import recalibrate_batchnorm, evaluate
from hybrid_ct.train.trainer import fit
torch.set_num_threads(2); logging.basicConfig(level=logging.WARNING)
r = load_recipe("shipped")
_, _, _, _, train, _, cv = recipe_slices(r, data_root(None), progress=False)
tcfg = TrainConfig(**{k: v for k, v in r["train"].items() if k in TrainConfig.__dataclass_fields__})
conv = r["train"]["from_twin"]; cfg = NetConfig(**r["net"])
twin, _ = load_checkpoint(sys.argv[1])
def rate(model):
    rep = energy_on_slices(model, cv)
    return rep.mean_firing_rate, rep.ratio
for k in [float(a) for a in sys.argv[2:]]:
    t0 = time.time()
    model = from_twin(twin, cfg, k)
    recalibrate_batchnorm(model, train, conv["calib_slices"], tcfg.batch_size, "cpu", tcfg.seed)
    with torch.no_grad():
        s0 = evaluate(model, cv, tcfg.batch_size, "cpu")["score"]
    fr0, ra0 = rate(model)
    ft = replace(tcfg, epochs=1, lr=conv["lr"])
    fit(model, train, None, ft, progress=False)
    with torch.no_grad():
        ev = evaluate(model, cv, tcfg.batch_size, "cpu")
    fr1, ra1 = rate(model)
    print(f"k={k}: converted score {s0:.3f} rate {fr0:.3f} ratio {ra0:.3f} | +200 it score {ev['score']:.3f} "
          f"rate {fr1:.3f} ratio {ra1:.3f} ({time.time() - t0:.0f} s)", flush=True)
