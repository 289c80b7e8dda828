"""The replay sample of a checkpoint rebuilt from its own recipe and split (``hybrid-ct replay``): what the app's
retraining mixes with corrections when the model came without one (the package's shipped model)."""
import numpy as np
import pytest

from hybrid_ct.data.slice_store import load_replay, replay_path
from hybrid_ct.errors import InputError
from hybrid_ct.net.checkpoint import save_checkpoint
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig
from hybrid_ct.train.recipes import recipe_slices, resolve_recipe
from hybrid_ct.train.replay import rebuild_replay


def _phantom_recipe():
    recipe = resolve_recipe("quick", phantoms=6, sources="")  # phantoms only: no real data needed
    recipe["data"]["sources"] = []
    return recipe


def test_the_rebuilt_replay_is_the_training_side_of_the_checkpoints_own_split(tmp_path):
    recipe = _phantom_recipe()
    _, val_groups, _, _, train, _, _ = recipe_slices(recipe, tmp_path, progress=False)
    assert val_groups and len(train)
    ckpt = save_checkpoint(tmp_path / "m.pt", HybridMultiTaskNet(NetConfig(**recipe["net"])),
                           {"recipe": recipe, "val_groups": val_groups})
    path, n = rebuild_replay(ckpt, data=tmp_path, progress=False)
    assert path == replay_path(ckpt) and path.is_file() and n == min(len(train), 512)
    replay = load_replay(path)
    groups = {g.removeprefix("replay:") for g in replay.group}
    assert groups <= set(train.group) and not groups & set(val_groups)  # never a validation slice
    assert replay.images.shape[-1] == recipe["net"]["in_size"] and np.asarray(replay.images).dtype == np.uint8


def test_a_checkpoint_of_another_split_or_without_a_recipe_is_refused(tmp_path):
    recipe = _phantom_recipe()
    net = HybridMultiTaskNet(NetConfig(**recipe["net"]))
    other = save_checkpoint(tmp_path / "other.pt", net, {"recipe": recipe, "val_groups": ["phantom_999"]})
    with pytest.raises(InputError, match="other validation groups"):
        rebuild_replay(other, data=tmp_path, progress=False)
    bare = save_checkpoint(tmp_path / "bare.pt", net, {})
    with pytest.raises(InputError, match="no training recipe"):
        rebuild_replay(bare, data=tmp_path, progress=False)
    assert not replay_path(other).exists() and not replay_path(bare).exists()
