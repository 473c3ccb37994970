"""Shared fixtures: a tiny tokenizer, tiny float64 models of each family, and one local Ray cluster."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Scan caches go to a directory of this test session's own, never the user's ~/.cache/whence.
if "WHENCE_CACHE" not in os.environ:
    import tempfile

    os.environ["WHENCE_CACHE"] = tempfile.mkdtemp(prefix="whence-test-cache-")

from tests.tiny import FAMILIES, make_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; more only fight the Ray workers for the two cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_model(family, tokenizer):
    return make_model(family, len(tokenizer))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (2 CPUs, as on CI)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh cluster for the tests, never one a `ray start` left on the machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                                           "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def fitted_workspace(tmp_path_factory, ray_cluster):
    """tests.pipeline_fixtures' workspace with float64 factors fitted on Ray by 2 workers (seq_len 16, batches of
    4), once a session: the modules that score it take a copy (tests.pipeline_fixtures.copy_workspace) rather
    than fit the same factors again, each of which costs a Ray fit (about 20 s on two cores)."""
    from flows.cluster import ClusterSettings
    from flows.fit import fit_corpus
    from tests.pipeline_fixtures import FIT_CONFIG, write_workspace

    root = tmp_path_factory.mktemp("fitted")
    space = write_workspace(root)
    space["root"], space["factors"] = root, str(root / "factors")
    fit_corpus(space["model"], [space["corpus"]], space["factors"], FIT_CONFIG,
               ClusterSettings(workers=2, dtype="float64"))
    return space
