"""Shared fixtures: the real data beside the repository, and small synthetic phantoms."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data (real public CT data, read in place); skips when it is absent."""
    if not (SHARED_DATA / "MANIFEST.csv").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_phantom():
    """A small positive phantom ``(image, label, info)``: shape (16, 64, 72), seed 3."""
    from hybrid_ct.data.phantom import make_phantom

    return make_phantom(3, shape=(16, 64, 72), positive=True)


@pytest.fixture(scope="session")
def small_negative_phantom():
    """A small negative phantom ``(image, label, info)``: same anatomy as ``small_phantom``."""
    from hybrid_ct.data.phantom import make_phantom

    return make_phantom(3, shape=(16, 64, 72), positive=False)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """An untrained tiny hybrid checkpoint (64 x 64, 3 levels, T = 2), seeded: for CLI and evaluation plumbing."""
    import torch

    from hybrid_ct.net.checkpoint import save_checkpoint
    from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig

    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("model") / "tiny.pt"
    cfg = NetConfig(levels=3, base_channels=4, max_channels=16, time_steps=2, fc_hidden=16, cls_pool=2, in_size=64)
    save_checkpoint(p, HybridMultiTaskNet(cfg), {"version": "tiny-test"})
    return p
