import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray for the tests that run stages on it."""
    import ray

    # address="local": a new instance even when another Ray was started with `ray start` on this machine
    # (ray.init() would attach to it through /tmp/ray/ray_current_cluster).
    # Workers import what the tests define (a method registered in a test module travels by reference).
    path = os.pathsep.join(p for p in (str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",
        runtime_env={"env_vars": {"PYTHONPATH": path}},
        num_cpus=2,
        object_store_memory=80 * 2**20,
        include_dashboard=False,
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: extra intra-op threads only add contention (x100 slower on a busy
    2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def planted_solv():
    """A tiny SOLV trained once per session on planted-object feature maps (tests/synthetic.py)."""
    from tests.synthetic import train_planted_solv

    return train_planted_solv()


@pytest.fixture(scope="module")
def davis_videos(tmp_path_factory):
    """Two synthetic DAVIS-layout videos of 6 frames (tests/synthetic.write_davis_videos)."""
    from tests.synthetic import write_davis_videos

    root = tmp_path_factory.mktemp("davis")
    write_davis_videos(root, n_videos=2, n_frames=6)
    return root


@pytest.fixture(scope="module")
def random_vit_weights(tmp_path_factory):
    """The tiny test ViT's random weights as a checkpoint file (runs then resolve it like real weights)."""
    import torch

    from stages.features.backbone import Backbone

    path = tmp_path_factory.mktemp("weights") / "test_vit_tiny.pth"
    torch.save(Backbone("test_vit_tiny", None, "cpu", random_init=True).model.state_dict(), path)
    return path
