"""Every YAML in configs/ parses with the entry point it is written for."""

from pathlib import Path

import pytest

from earlyexit.evaluate import build_parser

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {"demo.yaml", "smollm2_layers.yaml", "llama2_eval.yaml", "mistral_eval.yaml", "phi2_eval.yaml"} <= {c.name for c in CONFIGS}


def is_eval(path) -> bool:
    return not any(kind in path.name for kind in ("lora", "debug", "judge"))


@pytest.mark.parametrize("path", [c for c in CONFIGS if is_eval(c)], ids=lambda p: p.name)
def test_evaluation_configs_parse(path):
    cfg = build_parser().parse_args(["--config", str(path)])
    assert cfg.model.name and cfg.exit_layers and cfg.out_dir


@pytest.mark.parametrize("path", [c for c in CONFIGS if "judge" in c.name], ids=lambda p: p.name)
def test_judge_configs_parse(path):
    from earlyexit.judge import build_parser as judge_parser

    cfg = judge_parser().parse_args(["--config", str(path)])
    assert cfg.judge.kind and cfg.data.context_field and cfg.out_dir


@pytest.mark.parametrize("path", [c for c in CONFIGS if "lora" in c.name or "debug" in c.name], ids=lambda p: p.name)
def test_training_configs_parse(path):
    """Parsed by the training CLI itself, without building the model (no network, no weights)."""
    from earlyexit.data import AlpacaDataModule
    from earlyexit.module import EarlyExitModule
    from earlyexit.train import EarlyExitCLI

    class ParseOnly(EarlyExitCLI):
        def before_instantiate_classes(self):  # GPU configs on a CPU machine: parse, do not check the machine
            pass

        def instantiate_classes(self):
            pass

    cli = ParseOnly(EarlyExitModule, AlpacaDataModule, run=False, args=["--config", str(path)])
    assert cli.config.model.base.name and cli.config.data.source and cli.config.trainer


def test_the_lora_configs_exist():
    assert {"smollm2_lora.yaml", "llama2_lora.yaml", "mistral_lora.yaml", "phi2_lora.yaml", "debug.yaml"} <= {c.name for c in CONFIGS}
