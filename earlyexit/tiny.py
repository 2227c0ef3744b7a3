"""Random models built from configs (no network): tiny ones of every family, and full-size shapes for speed.

The tiny ones are what the tests and ``configs/debug.yaml`` run on: ``--model.name tiny-random-<model_type>``
(e.g. ``tiny-random-llama``) builds one, seeded, with a character-level tokenizer, and caches it. The shapes of
:data:`RANDOM_SHAPES` (``llama2-7b``, ``smollm2-135m``) are what the benchmarks time: honest for speed, meaningless for quality.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
EOS, PAD, BOS = 1, 0, 2
_COMMON = dict(vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS, tie_word_embeddings=False)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(**_DECODER, num_key_value_heads=2),
    "mistral": dict(**_DECODER, num_key_value_heads=2, sliding_window=8),
    "qwen2": dict(**_DECODER, num_key_value_heads=2),
    "gemma": dict(**_DECODER, num_key_value_heads=2, head_dim=8),
    "gemma2": dict(**_DECODER, num_key_value_heads=2, head_dim=8, sliding_window=8, final_logit_softcapping=2.0),
    "gemma3_text": dict(**_DECODER, num_key_value_heads=2, head_dim=8, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    "phi": dict(**_DECODER, partial_rotary_factor=0.5),
    "phi3": dict(**_DECODER, num_key_value_heads=2),
    "gpt2": dict(n_embd=32, n_inner=64, n_layer=4, n_head=4, n_positions=256),
    "gpt_neox": dict(**_DECODER, rotary_pct=0.5),
}


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A seeded random ``*ForCausalLM`` of ``model_type`` with 4 layers and < 1M parameters, in eval mode."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **_COMMON, **TINY_CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 1_000_000, f"tiny {model_type} has {n_params} parameters"
    assert model.config.num_hidden_layers == 4
    return model


def char_tokenizer():
    """A real character-level fast tokenizer (ids match the tiny models' EOS/PAD/BOS), built offline."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "</s>": EOS, "<s>": BOS, **{c: i + 3 for i, c in enumerate(string.printable)}}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    tok.padding_side = "left"
    return tok


def save_tiny(directory, model_type: str = "llama", seed: int = 0) -> str:
    """Save a tiny model with the character tokenizer as a loadable model directory."""
    model = tiny_model(model_type, seed)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return str(directory)



RANDOM_SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}


def random_model(shape: str, device, dtype: torch.dtype) -> torch.nn.Module:
    """A seeded randomly initialised ``*ForCausalLM`` of one of :data:`RANDOM_SHAPES`, built on ``device``."""
    if shape not in RANDOM_SHAPES:
        from earlyexit.errors import EarlyExitError

        raise EarlyExitError(f"no random shape {shape!r}; choose from {', '.join(sorted(RANDOM_SHAPES))}")
    spec = dict(RANDOM_SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
    return model.eval()


def random_with_exit_block(shape: str, device, dtype: torch.dtype, exit_layers: list[int]) -> torch.nn.Module:
    """:func:`random_model` with a shared exit block (exit adapters of kind ``block``) at ``exit_layers``: what the
    decoding benchmarks time dynamic exits and self-speculation on."""
    from earlyexit.adapters import ExitAdapters, attach, block_template

    model = random_model(shape, device, dtype)
    adapters = ExitAdapters(exit_layers, model.config.hidden_size, kind="block", template=block_template(model))
    attach(model, adapters.to(device))
    return model
