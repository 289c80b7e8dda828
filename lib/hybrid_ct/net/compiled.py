"""The served network under ``torch.compile``, counting its own spikes (issue 30).

``CompiledNet`` wraps the inference copy of a network (BatchNorm folded, as ``Predictor`` runs it):

- a private copy of it is compiled once (inductor, ``fullgraph=True``: a graph break raises instead of
  silently running half of the network eagerly) for ONE input shape, ``[batch_size, C, S, S]``: a shorter
  batch (the last of a volume) is padded with zeros and its padding dropped from every output and count,
  so a volume never triggers a recompile;
- ``warm_up`` pays the compilation at load (a server's start-up or a new version), not in a request;
- inductor's on-disk caches go to a folder of their own per checkpoint (``cache_dir``, keyed by its
  sha256, ``compile_cache_dir``): a restarted process re-traces the graph but loads the generated
  kernels instead of compiling them again;
- energy stays counted on the network that really runs: the copy carries forward hooks registered
  BEFORE compilation (so dynamo traces them into the graph; hooks added to a compiled module later
  are not seen by it) that return, per call and per sample, the very quantities ``EnergyMeter``'s hooks
  read (the ones in a synaptic layer's input and whether it holds anything but 0 / 1; the spikes of
  each neuron layer). ``EnergyMeter.add_counts`` turns them into the same report
  (tests/test_compiled.py checks it against the eager meter).
"""
from __future__ import annotations

import copy
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron

from hybrid_ct.net.energy import dense_ops

logger = logging.getLogger(__name__)

CACHE_ENV = "HYBRID_CT_COMPILE_CACHE"
BACKEND = "inductor"  # the tests of the plumbing set dynamo's "eager" (the same graph capture, no code generation)


def compile_cache_root() -> Path:
    """Where compiled networks are cached: ``$HYBRID_CT_COMPILE_CACHE``, else ``$XDG_CACHE_HOME`` (or
    ``~/.cache``) ``/hybrid_ct/compile``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hybrid_ct" / "compile"


def compile_cache_dir(sha256: str, root=None) -> Path:
    """The cache folder of one checkpoint (``files.file_sha256`` of it) and this torch version."""
    return Path(root or compile_cache_root()) / f"{sha256[:32]}-torch{torch.__version__}"


@contextmanager
def inductor_cache(path: Path | None):
    """Inductor's on-disk caches (FX graphs, AOTAutograd, C++ kernels) in ``path`` while inside."""
    if path is None:
        yield
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    try:
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # an older / newer torch without it: the environment variable alone
        saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
        return
    with temporary_cache_dir(str(path)):
        yield


def metered_modules(model: nn.Module):
    """(name, module, kind) of every module ``EnergyMeter`` hooks: "syn" (conv / transposed conv /
    linear) or "neuron" (spikingjelly neuron), in ``named_modules`` order."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            yield name, m, "syn"
        elif isinstance(m, neuron.BaseNode):
            yield name, m, "neuron"


class _Counted(nn.Module):
    """``net`` that also returns the records of its metered layers: ``forward(x) -> (outputs, records)``.
    The hooks append to a list made inside ``forward`` (no state outlives a call: nothing for dynamo to
    guard on between calls)."""

    def __init__(self, net: nn.Module, batch_size: int):
        super().__init__()
        self.net, self.batch_size, self.sink = net, int(batch_size), None
        for name, m, kind in metered_modules(net):
            m.register_forward_hook(self._syn_hook(name) if kind == "syn" else self._neuron_hook(name))

    def forward(self, x):
        self.sink = []
        out = self.net(x)
        calls, self.sink = self.sink, None
        return out, calls

    def _syn_hook(self, name):
        def hook(module, inputs, output):
            x, b = inputs[0], self.batch_size
            flat = x.reshape(x.shape[0] // b, b, -1)  # [steps, B, ...]: spikingjelly flattens T before B
            ones = flat.sum(dim=(0, 2), dtype=torch.float64)
            other = ((flat != 0) & (flat != 1)).sum(dim=(0, 2))
            self.sink.append(("syn", name, float(dense_ops(module, x, output)), x.shape[0] // b, x.numel() // b,
                              ones, other))
        return hook

    def _neuron_hook(self, name):
        def hook(module, inputs, output):
            b = self.batch_size
            flat = output.reshape(output.shape[0], b, -1)  # [T, B, ...]
            self.sink.append(("neuron", name, flat.sum(dim=(0, 2), dtype=torch.float64), output.numel() // b))
        return hook


class CompiledNet:
    """``torch.compile`` of a copy of ``model`` (eval, no grad) that also returns its spike counts."""

    def __init__(self, model: nn.Module, batch_size: int, cache_dir: Path | None = None,
                 backend: str | None = None):
        self.batch_size = int(batch_size)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.backend = backend = backend or BACKEND
        # a copy: the served model's own hooks (the eager meter) never see these calls, nor these hooks its
        self.net = _Counted(copy.deepcopy(model).eval(), self.batch_size)
        self.fn = torch.compile(self.net, backend=backend, fullgraph=True, dynamic=False)
        self.compile_s: float | None = None

    def warm_up(self, in_channels: int, size: int, device="cpu") -> float:
        """Compile now (one forward on zeros): -> seconds taken (the compile, or the cache's load)."""
        t0 = time.perf_counter()
        self(torch.zeros(self.batch_size, in_channels, size, size, device=device))
        self.compile_s = time.perf_counter() - t0
        logger.info("compiled the network in %.1f s (cache %s)", self.compile_s, self.cache_dir or "inductor's default")
        return self.compile_s

    @torch.no_grad()
    def __call__(self, xb: torch.Tensor) -> tuple[dict, list]:
        """-> (the network's outputs for the ``len(xb)`` inputs, their counts for ``EnergyMeter.add_counts``)."""
        n = len(xb)
        if n > self.batch_size:
            raise ValueError(f"batch of {n} inputs, compiled for at most {self.batch_size}")
        if n < self.batch_size:
            xb = torch.cat([xb, xb.new_zeros((self.batch_size - n, *xb.shape[1:]))])
        with inductor_cache(self.cache_dir if self.compile_s is None else None):
            out, calls = self.fn(xb)
        calls = [_trim(c, n, self.batch_size) for c in calls]
        return {k: v[:n] if torch.is_tensor(v) else v for k, v in out.items()}, calls


def _trim(call: tuple, n: int, b: int) -> tuple:
    """One hook record of a batch of ``b`` cut to its first ``n`` samples, as plain numbers (a layer's
    operation count is proportional to the batch)."""
    if call[0] == "syn":
        kind, name, ops, steps, numel, ones, other = call
        return kind, name, ops / b * n, steps, numel, float(ones[:n].sum()), int(other[:n].sum())
    kind, name, spikes, numel = call
    return kind, name, float(spikes[:n].sum()), numel


__all__ = ["CompiledNet", "compile_cache_dir", "compile_cache_root", "inductor_cache", "metered_modules"]
