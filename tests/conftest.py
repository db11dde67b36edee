"""Test setup, before jax is first imported: 8 simulated CPU devices, XLA's cheapest
compiles, and a persistent compilation cache.

Compiling, not computing, is most of the suite's time: its networks are tiny, and many
tests (and the processes they start, which inherit this environment) compile the same
train step again. `JAX_DISABLE_MOST_OPTIMIZATIONS` is jax's own switch for that trade
(LLVM at -O0, without its expensive passes); the results the tests compare do not change
with it. Both pytest-xdist workers share one cache directory: jax writes an entry without
a lock, so a read racing a write of the same entry finds it torn, warns and compiles again."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rvm-tests-jax-cache")
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
