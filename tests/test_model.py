"""The exit-aware model against references: the model's own logits, a naive per-layer loop, HF generate."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.testing import assert_close

from earlyexit.arch import spec_for
from earlyexit.errors import EarlyExitError
from earlyexit.model import EarlyExitHead, finish, parse_exit_layers, positions, quarter_layers
from tiny import EOS, PAD, VOCAB


def batch(seed=0, lengths=(9, 6, 3)):
    """Left-padded random prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def naive_greedy(ee: EarlyExitHead, ids, mask, layer: int, steps: int) -> torch.Tensor:
    """Reference: at every step rerun the whole model without a cache and read block L's output."""
    out = []
    for _ in range(steps):
        hidden = ee.hidden_states(ids, mask, exit_layers=[layer])[layer]
        nxt = ee.exit_logits(hidden[:, -1]).argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], 1)
    return torch.stack(out, 1)


def test_exit_at_last_layer_is_the_models_own_logits(tiny):
    ids, mask = batch()
    ee = EarlyExitHead(tiny)
    hidden = ee.hidden_states(ids, mask)
    own = tiny(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert_close(ee.exit_logits(hidden[ee.n_layers]), own)
    assert_close(ee(ids, mask), own)


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_truncated_forward_equals_exit_from_full_pass(tiny, layer):
    ids, mask = batch()
    ee = EarlyExitHead(tiny)
    full = ee.hidden_states(ids, mask)  # all blocks ran
    assert_close(ee(ids, mask, exit_layer=layer), ee.exit_logits(full[layer]))


def test_truncated_forward_runs_only_the_first_blocks(tiny):
    ee = EarlyExitHead(tiny)
    ran = []
    hooks = [block.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, block in enumerate(ee.blocks, 1)]
    ids, mask = batch()
    ee.generate(ids, mask, exit_layer=2, max_new_tokens=3)
    for h in hooks:
        h.remove()
    assert set(ran) == {1, 2}
    assert len(ee.blocks) == 4 and tiny.config.num_hidden_layers == 4  # restored


def test_greedy_at_last_layer_equals_hf_generate(tiny):
    ids, mask = batch()
    ee = EarlyExitHead(tiny)
    ours = ee.generate(ids, mask, exit_layer=ee.n_layers, max_new_tokens=8)
    ref = tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    assert torch.equal(ours.tokens, finish(ref[:, ids.shape[1]:], [EOS], PAD, 8).tokens)
    fixed = ee.generate(ids, mask, exit_layer=ee.n_layers, max_new_tokens=8, ignore_eos=True)
    ref = tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                        pad_token_id=PAD)
    assert torch.equal(fixed.tokens, ref[:, ids.shape[1]:]) and not fixed.finished.any()


@pytest.mark.parametrize("layer", [1, 3])
def test_greedy_at_an_exit_equals_a_naive_per_layer_loop(tiny, layer):
    ids, mask = batch(seed=1)
    ee = EarlyExitHead(tiny)
    ours = ee.generate(ids, mask, exit_layer=layer, max_new_tokens=6)
    assert torch.equal(ours.tokens, finish(naive_greedy(ee, ids, mask, layer, 6), [EOS], PAD, 6).tokens)


def test_generation_stops_at_eos_and_counts_tokens(tiny):
    ee = EarlyExitHead(tiny)
    ids, mask = batch()
    free = ee.generate(ids, mask, exit_layer=2, max_new_tokens=6)
    row = int((~free.finished).nonzero()[0])
    stop = int(free.tokens[row, 2])  # make the third token of that row a stop token too
    gen = ee.generate(ids, mask, exit_layer=2, max_new_tokens=6, eos_token_id=[EOS, stop], pad_token_id=PAD)
    n = int((free.tokens[row] == stop).int().argmax())
    assert gen.finished[row] and gen.n_tokens[row] == n
    assert (gen.tokens[row, n:] == PAD).all()
    assert torch.equal(gen.tokens[row, :n], free.tokens[row, :n])
    assert gen.tokens.shape == (3, 6)


def test_lora_wrapped_exits_use_the_shared_head(tiny):
    spec = spec_for(tiny.config.model_type)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=list(spec.lora_targets), init_lora_weights=False)
    peft_model = get_peft_model(tiny, lora).eval()
    ee = EarlyExitHead(peft_model)
    assert ee.head is peft_model.get_base_model().get_output_embeddings()
    ids, mask = batch()
    own = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert_close(ee.exit_logits(ee.hidden_states(ids, mask)[ee.n_layers]), own)
    # The adapters are live at an early exit: dropping them changes exit-2 logits.
    with_lora = ee(ids, mask, exit_layer=2)
    with peft_model.disable_adapter():
        without = ee(ids, mask, exit_layer=2)
    assert not torch.allclose(with_lora, without)
    # The head is shared, not copied: a change to it shows at every exit.
    with torch.no_grad():
        ee.head.weight.mul_(2)
    assert not torch.allclose(ee(ids, mask, exit_layer=2), with_lora)


def test_exit_layer_sets():
    assert quarter_layers(32) == [8, 16, 24, 32]
    assert quarter_layers(30) == [8, 15, 22, 30]
    assert parse_exit_layers("all", 4) == [1, 2, 3, 4]
    assert parse_exit_layers("every3", 30) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert parse_exit_layers("16, 8,8", 32) == [8, 16]
    assert parse_exit_layers([4, 2], 4) == [2, 4]


@pytest.mark.parametrize("bad", [0, 5, -1, "0", "1,9", "x"])
def test_exit_layer_out_of_range_is_a_clear_error(bad):
    with pytest.raises(EarlyExitError, match="out of range|expected"):
        parse_exit_layers(bad, 4)


def test_exit_layer_checked_by_the_model(tiny):
    ee = EarlyExitHead(tiny)
    ids, mask = batch()
    for bad in (0, 5):
        with pytest.raises(EarlyExitError, match=r"layers 1\.\.4"):
            ee(ids, mask, exit_layer=bad)


def test_unwrapped_strips_activation_checkpointing_wrappers():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from earlyexit.model import unwrapped

    inner = torch.nn.Linear(2, 2)
    assert unwrapped(checkpoint_wrapper(checkpoint_wrapper(inner))) is inner
    assert unwrapped(inner) is inner
