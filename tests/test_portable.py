"""A clone works anywhere: the Alpaca sample ships in the package, nothing reads a folder beside the checkout,
and asking the hub without a network fails in seconds with one line."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from earlyexit.data import SAMPLE, AlpacaDataModule, read_records, sample_path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SHA256 = "fc1add24c93c9fbbe585a64a6c9bf6165eb110225f4470efbff382a913558ec0"
OUTSIDE = ".." + "/shared"  # spelled in two parts so that this file does not match itself


def test_no_tracked_file_reads_a_folder_beside_the_checkout():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    hits = []
    for name in filter(None, files):
        path = ROOT / name.decode()
        if path.is_file() and OUTSIDE.encode() in path.read_bytes():
            hits.append(name.decode())
    assert not hits, f"tracked files mention {OUTSIDE}: {hits}"


def test_the_shipped_sample_is_the_verbatim_5000_records():
    assert hashlib.sha256(sample_path().read_bytes()).hexdigest() == SAMPLE_SHA256
    records = read_records(SAMPLE)
    assert len(records) == 5000 and set(records[0]) == {"instruction", "input", "output"}


def test_the_sample_is_package_data():
    cfg = (ROOT / "setup.cfg").read_text()
    assert "assets/*.json" in cfg and sample_path().parent.name == "assets"
    assert (sample_path().parent / "DATA_CARD.md").is_file()


def test_the_data_module_defaults_to_the_shipped_sample():
    data = AlpacaDataModule(limit=3)
    assert data.hparams.source == SAMPLE
    assert [i for i, _ in data.eval_records()] == [0, 1, 2]


def _run(args, env_extra, timeout=60):
    env = {**os.environ, **env_extra}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    return proc, time.perf_counter() - start


# A closed local port stands for "no network": the probe's connection is refused at once.
NO_NETWORK = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}


@pytest.mark.parametrize("env", [NO_NETWORK, {"HF_HUB_OFFLINE": "1"}], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_hub_data_without_network_fails_fast_with_one_line(tmp_path, env):
    proc, seconds = _run(["earlyexit.evaluate", "--data.source", "tatsu-lab/alpaca", "--model.name", "tiny-random-llama",
                          "--out_dir", str(tmp_path / "out")], {**env, "EARLYEXIT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: dataset 'tatsu-lab/alpaca'") and "--data.source alpaca-sample" in lines[-1], proc.stderr
    assert seconds < 20  # the command itself (Python start-up and imports included); the hub check is bounded by 3 s


@pytest.mark.parametrize("env", [NO_NETWORK, {"HF_HUB_OFFLINE": "1"}], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_hub_model_without_network_fails_fast_with_one_line(tmp_path, env):
    proc, _ = _run(["earlyexit.evaluate", "--model.name", "nobody-here/no-such-model", "--data.limit", "2",
                    "--out_dir", str(tmp_path / "out")], {**env, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nobody-here/no-such-model" in last and "smollm2-135m-instruct" in last, proc.stderr


def test_hub_probe_is_bounded():
    from earlyexit import network as hub

    hub._reachable = None
    old = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
    try:
        start = time.perf_counter()
        assert hub.hub_reachable() is False
        assert time.perf_counter() - start < hub.PROBE_TIMEOUT_S + 1
    finally:
        hub._reachable = None
        if old is None:
            del os.environ["HF_ENDPOINT"]
        else:
            os.environ["HF_ENDPOINT"] = old
