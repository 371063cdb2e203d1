import numpy as np
import pytest
import torch

# one thread: CI and dev machines have 2 cores, and oversubscribed OpenMP threads slow tests 5x
torch.set_num_threads(1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def nsd_tree(tmp_path_factory):
    """A small NSD-format tree (subject 1, 3 sessions of 750 trials, (6, 7, 5) volume, NIfTI betas,
    sparse imgBrick, COCO captions); see tests/nsd_fixtures.py. Use ``.root`` and ``.subject``."""
    from nsd_fixtures import make_nsd_tree

    return make_nsd_tree(tmp_path_factory.mktemp("nsd"), subject=1, n_sessions=3)


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """(bundle folder, world root, cache) for the app's tests: a 2-subject world and a tiny bundle for both
    (tests/app_sources.py), built once per test session."""
    from app_sources import make_app_sources

    return make_app_sources(tmp_path_factory.mktemp("app"))


@pytest.fixture
def app(sources, monkeypatch):
    """An AppTest of app.py on :func:`sources` (not run yet)."""
    from app_sources import make_app_test

    return make_app_test(sources, monkeypatch)


@pytest.fixture(scope="session")
def batch_sources(sources, tmp_path_factory):
    """:func:`sources` with a bundle copy whose voxel-mask checksums match the world (the batch commands check
    them); tests/batch_sources.py."""
    from batch_sources import make_batch_sources

    return make_batch_sources(sources, tmp_path_factory.mktemp("batch"))


@pytest.fixture
def loopback():
    """streamlit's server.address set to 127.0.0.1 for the test (as `make run` serves): any folder opens."""
    from streamlit import config

    before = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    try:
        yield
    finally:
        config.set_option("server.address", before)
