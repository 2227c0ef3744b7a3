import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from earlyexit.arch import ARCHITECTURES, fast_path, get_submodule, spec_for
from earlyexit.errors import EarlyExitError
from earlyexit.model import EarlyExitHead
from tiny import TINY_CONFIGS


def test_every_family_has_a_tiny_model():
    assert set(TINY_CONFIGS) == set(ARCHITECTURES)


def test_the_fast_path_takes_the_llama_style_families_with_their_own_activation():
    configs = {family: AutoConfig.for_model(family) for family in ("llama", "mistral", "qwen2", "gemma3_text", "gpt2")}
    assert [family for family, config in configs.items() if fast_path(config)] == ["llama", "mistral", "qwen2"]
    configs["llama"].hidden_act = "gelu"  # another MLP activation: the model's own blocks
    assert not fast_path(configs["llama"])


def test_unknown_family_lists_supported_ones():
    with pytest.raises(EarlyExitError, match="supported model types: .*gpt2.*llama"):
        spec_for("bert")


def test_unsupported_model_is_refused():
    config = AutoConfig.for_model("opt", vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                  num_attention_heads=2, word_embed_proj_dim=16)
    with pytest.raises(EarlyExitError, match="unsupported architecture 'opt'"):
        EarlyExitHead(AutoModelForCausalLM.from_config(config))


def test_paths_resolve_to_the_models_own_modules(tiny):
    spec = spec_for(tiny.config.model_type)
    assert isinstance(get_submodule(tiny, spec.layers), torch.nn.ModuleList)
    assert get_submodule(tiny, spec.head) is tiny.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, _ in tiny.named_modules()}
    assert set(spec.lora_targets) <= names
