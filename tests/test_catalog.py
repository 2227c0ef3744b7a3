"""Real models from PyPI packages by short name (earlyexit/catalog.py): joined and checked, loaded, and decoded from
two exits token for token like a naive loop that recomputes the whole sequence at every step."""

import pytest
import torch

from earlyexit import catalog
from earlyexit.catalog import CATALOG, Packaged
from earlyexit.engine import Engine
from earlyexit.errors import EarlyExitError
from earlyexit.loading import ModelArgs, load_model
from earlyexit.model import EarlyExitHead

REAL = [name for name in CATALOG if name != "smollm2-135m-instruct"]  # the default is tested in test_loading.py


def naive(ee: EarlyExitHead, ids: list[int], layer: int, steps: int) -> list[int]:
    """Greedy decoding from exit ``layer`` by a full forward of the whole sequence at every step (no cache): the
    exit's logits are the final norm and head on block ``layer``'s output at the last position."""
    tokens = list(ids)
    for _ in range(steps):
        out = ee.lm(input_ids=torch.tensor([tokens]), output_hidden_states=True)
        tokens.append(int(ee.exit_logits(out.hidden_states[layer][0, -1]).argmax()))
    return tokens[len(ids):]


@pytest.mark.parametrize("name", REAL)
def test_a_real_model_decodes_its_exits_like_the_naive_loop(name, tmp_path_factory):
    if not catalog.installed(name):
        pytest.skip(f"{name} is not installed (make models installs {' '.join(CATALOG[name].install)})")
    model, tokenizer = load_model(ModelArgs(name=name, dtype="float32", device="cpu"))
    ee = EarlyExitHead(model)
    n = ee.n_layers
    exits = [n // 4, n // 2]
    prompts = ["The capital of France is", "def add(a, b):\n    return"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    got = Engine(ee).generate(batch.input_ids, batch.attention_mask, exits, max_new_tokens=6)
    eos, _ = ee.eos_and_pad(None, None)
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        for layer in exits:
            ref = naive(ee, ids, layer, 6)
            ref = ref[: next((i for i, token in enumerate(ref) if token in eos), len(ref))]  # up to EOS
            k = int(got[layer].n_tokens[row])
            assert got[layer].tokens[row, :k].tolist() == ref, (name, prompt, layer)


def test_a_model_whose_packages_are_missing_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setitem(CATALOG, "absent-1m", Packaged("absent.gguf", "0" * 64, (("earlyexit_no_such_part", "x.bin"),),
                                                        ("absent-part1==1.0",), "a model nobody installed"))
    with pytest.raises(EarlyExitError, match=r"absent-1m needs the packages absent-part1==1.0: make models"):
        load_model(ModelArgs(name="absent-1m", device="cpu"))
    assert not catalog.installed("absent-1m")


def test_parts_are_joined_in_order_and_a_wrong_digest_is_refused(tmp_path, monkeypatch):
    import hashlib
    import sys

    site = tmp_path / "site"
    chunks = [b"first-", b"second-", b"third"]
    for i, chunk in enumerate(chunks):
        package = site / f"fake_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / "p.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    for i in range(3):
        sys.modules.pop(f"fake_part{i}", None)
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    parts = tuple((f"fake_part{i}", "data/p.bin") for i in range(3))
    monkeypatch.setitem(CATALOG, "fake", Packaged("fake.gguf", digest, parts, ("fake-parts",), ""))
    joined = catalog.gguf("fake", tmp_path / "cache")
    assert joined.read_bytes() == b"first-second-third" and joined == catalog.gguf("fake", tmp_path / "cache")
    monkeypatch.setitem(CATALOG, "fake", Packaged("fake2.gguf", "f" * 64, parts, ("fake-parts",), ""))
    with pytest.raises(EarlyExitError, match="expected f{64}: reinstall fake-parts"):
        catalog.gguf("fake", tmp_path / "cache")
    assert not (tmp_path / "cache" / ".gguf" / "fake2.gguf").exists()  # a bad join is not kept


STUDY = {"smollm2-135m-instruct": "smollm2_quarters_ee.yaml", "gemma3-270m": "gemma3_ee.yaml",
         "qwen2.5-coder-0.5b-instruct": "qwen2_ee.yaml"}


@pytest.mark.parametrize("name", STUDY)
def test_each_study_recipe_builds_its_quarter_exits_on_its_real_model(name):
    """configs/<model>_ee.yaml parsed by the training CLI and its module built on the real model: the shared block at
    N/4, N/2 and 3N/4, the loss on those and N, the block a copy of the last block (Gemma 3: a global one)."""
    from pathlib import Path

    from earlyexit.data import AlpacaDataModule
    from earlyexit.model import quarter_layers
    from earlyexit.module import EarlyExitModule
    from earlyexit.train import EarlyExitCLI

    if name != "smollm2-135m-instruct" and not catalog.installed(name):
        pytest.skip(f"{name} is not installed (make models installs {' '.join(CATALOG[name].install)})")

    class ParseOnly(EarlyExitCLI):
        def before_instantiate_classes(self):
            pass

        def instantiate_classes(self):
            pass

    config = Path(__file__).resolve().parents[1] / "configs" / STUDY[name]
    cli = ParseOnly(EarlyExitModule, AlpacaDataModule, run=False, args=["--config", str(config)])
    model = cli.config.model
    assert model.base.name == name
    settings = {key: (vars(value) if hasattr(value, "__dict__") else value) for key, value in vars(model).items()}
    settings["base"] = {**settings["base"], "device": "cpu"}
    module = EarlyExitModule(**settings)
    n = module.ee.n_layers
    quarters = quarter_layers(n)
    assert module.ee.adapters.kind == "block" and module.ee.adapters.layers == quarters[:-1]
    assert module.train_exits == quarters
    types = getattr(module.ee.config, "layer_types", None)
    if name == "gemma3-270m":
        assert types[-1] == "full_attention" and module.ee.adapters.block.self_attn.sliding_window is None
