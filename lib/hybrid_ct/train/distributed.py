"""Distributed training entry point: one process per GPU (or CPU processes with gloo), the one loop
(``hybrid_ct.train.trainer.Trainer``) on a recipe's data.

    torchrun --nproc_per_node N -m hybrid_ct.train.distributed --recipe quick --out DIR      # DIR/hybrid.pt
    python -m hybrid_ct.train.distributed --recipe my_recipe.json --out model.pt           # one process

``--recipe`` is a recipe name or a JSON recipe file (``net`` / ``train`` / ``data``, as ``hybrid-ct train``
uses). The process group comes from torchrun's environment (nccl with CUDA, gloo on the CPU); every rank
loads the data and draws the same epoch sample, trains ``batch_size`` slices per step on its shard, and
rank 0 validates and saves the final weights with ``checkpoint.save_checkpoint`` (meta: the recipe,
history, best epoch, world size and ``replica_max_abs_diff``, the largest weight difference between
ranks at the end -- 0 when they stayed in sync). The network is trained from scratch (``--kind``
hybrid or its CNN twin); the twin-to-spiking conversion of a recipe's ``from_twin`` is ``hybrid-ct
train``'s.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
from pathlib import Path
from hybrid_ct.data.manifest import data_root
from hybrid_ct.files import jsonable
from hybrid_ct.net.checkpoint import save_checkpoint
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig, cnn_twin
from hybrid_ct.train.config import TrainConfig
from hybrid_ct.train.recipes import load_recipe, recipe_slices
from hybrid_ct.train.trainer import Trainer, init_distributed
from hybrid_ct.net.device import choose_device

log = logging.getLogger("hybrid_ct.train.distributed")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hybrid_ct.train.distributed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="quick", help="recipe name or JSON recipe file")
    ap.add_argument("--out", required=True, help="checkpoint to write (rank 0): a .pt file, or a folder for <kind>.pt")
    ap.add_argument("--kind", choices=("hybrid", "cnn_twin"), default="hybrid")
    ap.add_argument("--data", help="real data folder (default: $HYBRID_CT_DATA or ../shared/data)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--max-iters", type=int, help="iterations per epoch (cap)")
    ap.add_argument("--batch-size", type=int, help="slices per step and process")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist


    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = None if args.device == "auto" else torch.device(args.device)
    if device is not None and device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    if world > 1:
        device = init_distributed(device=device)
    elif device is None:
        device = torch.device(choose_device("auto"))
    rank = dist.get_rank() if world > 1 else 0
    logging.basicConfig(level=logging.WARNING if args.quiet or rank else logging.INFO,
                        format=f"%(levelname)s [rank {rank}] %(name)s: %(message)s", force=True)


    recipe = load_recipe(args.recipe)
    t = recipe["train"]
    for key, value in (("epochs", args.epochs), ("max_iters_per_epoch", args.max_iters),
                       ("batch_size", args.batch_size), ("seed", args.seed)):
        if value is not None:
            t[key] = value
    progress = rank == 0 and not args.quiet
    _, _, _, _, train, _, curve_val = recipe_slices(recipe, data_root(args.data), progress)
    cfg = NetConfig(**recipe["net"])
    cfg = cnn_twin(cfg) if args.kind == "cnn_twin" else cfg
    tcfg = TrainConfig(**{k: v for k, v in t.items() if k in TrainConfig.__dataclass_fields__}, device=str(device))
    log.info("%s on %d process(es), %s: %d training slices, %d validation slices, %d per step and process",
             args.kind, world, device, len(train), len(curve_val), tcfg.batch_size)
    torch.manual_seed(tcfg.seed)
    model = HybridMultiTaskNet(cfg)
    trainer = Trainer(model, tcfg, train, curve_val, progress=progress)
    try:
        history = trainer.fit()
        divergence = trainer.replica_divergence()
        if rank == 0:
            meta = {"version": f"hybrid-ct-{Path(args.recipe).stem}-{_dt.date.today().isoformat()}",
                    "kind": args.kind, "recipe": recipe, "net": cfg.to_dict(), "world_size": world,
                    "history": history, "best_metric": trainer.best_score, "best_metric_epoch": trainer.best_epoch,
                    "replica_max_abs_diff": divergence, "complete": True}
            out = Path(args.out) if args.out.endswith(".pt") else Path(args.out) / f"{args.kind}.pt"
            save_checkpoint(out, model.cpu(), jsonable(meta))
            log.info("saved %s (replicas differ by at most %.3g)", out, divergence)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
