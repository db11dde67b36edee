"""Test setup, before jax is first imported: 8 simulated CPU devices, and a persistent
compilation cache, since many tests (and the subprocess runs) compile the same tiny
train step again and again. Each pytest-xdist worker keeps a cache of its own: jax
writes cache entries without a lock, so two processes must not share one."""

import os
import tempfile

worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"rvm-tests-jax-cache-{worker}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402  (after the environment above, which jax reads when imported)


@pytest.fixture(scope="session")
def one_epoch(tmp_path_factory):
    """The tiny run (`helpers.tiny_config`) stopped after its first epoch (step 8), with its
    checkpoint, trained once per worker for every module that copies it."""
    from helpers import tiny_config, train

    workdir = tmp_path_factory.mktemp("one_epoch") / "run"
    train(tiny_config(), workdir, max_steps=8)
    return workdir
