"""Every YAML in configs/ parses with the entry point it is written for."""

from pathlib import Path

import pytest

from earlyexit.evaluate import build_parser

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {"demo.yaml", "smollm2_layers.yaml", "llama2_eval.yaml", "mistral_eval.yaml", "phi2_eval.yaml"} <= {c.name for c in CONFIGS}


@pytest.mark.parametrize("path", [c for c in CONFIGS if "lora" not in c.name and "debug" not in c.name], ids=lambda p: p.name)
def test_evaluation_configs_parse(path):
    cfg = build_parser().parse_args(["--config", str(path)])
    assert cfg.model.name and cfg.exit_layers and cfg.out_dir
