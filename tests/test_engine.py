"""The decoding engine against the references: the model's own ``generate`` truncated at each exit (a separate
run per exit), full-depth greedy for self-speculation, and a recompute-from-scratch loop for dynamic exits."""

import pytest
import torch

from earlyexit.adapters import ExitAdapters, attach
from earlyexit.arch import sliding_windows
from earlyexit.engine import Engine, StaticKV, additive_mask, confidence
from earlyexit.errors import EarlyExitError
from earlyexit.generation import GenerationArgs, nucleus
from earlyexit.model import EarlyExitHead
from tiny import tiny_model


def prompts(seed=1, batch=3, length=7):
    """Left-padded prompts of different lengths (7, 4 and 2 real tokens)."""
    torch.manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length))
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 5][:batch]):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_all_exits_in_one_pass_equal_separate_runs(tiny):
    """Every family, padded batch, long enough to pass the sliding windows (8) of mistral and gemma2."""
    ee = EarlyExitHead(tiny)
    ids, mask = prompts()
    got = Engine(ee).generate(ids, mask, [1, 2, 3, 4], max_new_tokens=12, ignore_eos=True)
    assert sorted(got) == [1, 2, 3, 4]
    for layer in (1, 2, 3, 4):
        ref = ee.generate(ids, mask, layer, max_new_tokens=12, ignore_eos=True)
        assert torch.equal(got[layer].tokens, ref.tokens), layer
        assert torch.equal(got[layer].n_tokens, ref.n_tokens)


def test_all_exits_stop_at_eos_like_generate():
    ee = EarlyExitHead(tiny_model("llama"))
    ids, mask = prompts()
    free = ee.generate(ids, mask, 2, max_new_tokens=30, ignore_eos=True)
    eos = int(free.tokens[0, 3])  # a token row 0 emits at step 3 becomes EOS: rows stop at different steps
    got = Engine(ee).generate(ids, mask, [2, 4], max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    for layer in (2, 4):
        ref = ee.generate(ids, mask, layer, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(got[layer].tokens, ref.tokens)
        assert torch.equal(got[layer].finished, ref.finished)
    assert got[2].finished[0] and got[2].n_tokens[0] <= 3


def test_a_layer_cache_holds_only_the_rows_that_reach_it(monkeypatch):
    ee = EarlyExitHead(tiny_model("llama"))
    ids, mask = prompts()
    caches = []
    layer = StaticKV.layer
    monkeypatch.setattr(StaticKV, "layer", lambda cache, *args: (caches.append(cache), layer(cache, *args))[1])
    Engine(ee).generate(ids, mask, [1, 3], max_new_tokens=4)
    assert {layer: keys.shape[0] for layer, keys in caches[0].keys.items()} == {0: 6, 1: 3, 2: 3}  # block 4 never ran


def test_programs_are_reused_across_calls_of_one_shape():
    ee = EarlyExitHead(tiny_model("llama"))
    ids, mask = prompts()
    engine = Engine(ee)
    first = engine.generate(ids, mask, [2, 4], max_new_tokens=8, ignore_eos=True)
    other = engine.generate(ids.flip(0), mask.flip(0), [2, 4], max_new_tokens=8, ignore_eos=True)
    again = engine.generate(ids, mask, [2, 4], max_new_tokens=8, ignore_eos=True)
    assert engine.programs == 1
    assert all(torch.equal(first[layer].tokens, again[layer].tokens) for layer in (2, 4))
    assert torch.equal(other[4].tokens, first[4].tokens.flip(0))
    spec = [engine.generate_speculative(ids, mask, 2, 3, max_new_tokens=8, ignore_eos=True) for _ in range(2)]
    assert torch.equal(spec[0].tokens, spec[1].tokens) and spec[0].accepted == spec[1].accepted


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "phi"])
@pytest.mark.parametrize("draft_layer,n_draft", [(1, 1), (2, 3), (3, 5), (1, 8)])
def test_self_speculative_greedy_equals_full_depth(family, draft_layer, n_draft):
    """Batch of 3 prompts of different lengths; rows accept different numbers of drafts."""
    ee = EarlyExitHead(tiny_model(family))
    ids, mask = prompts()
    ref = ee.generate(ids, mask, 4, max_new_tokens=20, ignore_eos=True)
    got = Engine(ee).generate_speculative(ids, mask, draft_layer, n_draft, max_new_tokens=20, ignore_eos=True)
    assert torch.equal(got.tokens, ref.tokens)
    assert 0 <= got.accepted <= got.drafted and got.cycles >= 20 / (n_draft + 1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adaptive_drafting_keeps_greedy_exact_and_drafts_less(family):
    """Kangaroo-style: a cycle stops drafting once no running row is sure of its next draft. The answers stay the
    full model's; a threshold above 1 drafts nothing (every cycle is one full-depth step); 0 is plain drafting."""
    ee = EarlyExitHead(tiny_model(family))
    ids, mask = prompts()
    ref = ee.generate(ids, mask, 4, max_new_tokens=20, ignore_eos=True)
    engine = Engine(ee)
    plain = engine.generate_speculative(ids, mask, 2, 4, max_new_tokens=20, ignore_eos=True)
    with torch.no_grad():  # a threshold some drafts pass and some do not: the draft exit's median top probability
        sure = ee.exit_logits(ee.hidden_states(ids, mask)[2], 2).softmax(-1).max(-1).values
    some = engine.generate_speculative(ids, mask, 2, 4, max_new_tokens=20, ignore_eos=True,
                                       draft_threshold=float(sure.median()))
    none = engine.generate_speculative(ids, mask, 2, 4, max_new_tokens=20, ignore_eos=True, draft_threshold=1.0)
    for got in (plain, some, none):
        assert torch.equal(got.tokens, ref.tokens)
    assert none.drafted == 0 and none.accepted == 0 and none.cycles == 19  # one token a cycle after the prompt's
    # one row: a sure draft goes on, an unsure one stops the cycle (in a batch, drafting goes on while any row is sure)
    alone = engine.generate_speculative(ids[:1], mask[:1], 2, 4, max_new_tokens=20, ignore_eos=True)
    fewer = engine.generate_speculative(ids[:1], mask[:1], 2, 4, max_new_tokens=20, ignore_eos=True,
                                        draft_threshold=float(sure.median()))
    assert torch.equal(fewer.tokens, ref.tokens[:1])
    assert 0 < fewer.drafted < alone.drafted and some.drafted <= plain.drafted


def test_adaptive_drafting_stops_at_eos_and_samples_the_full_model():
    ee = EarlyExitHead(tiny_model("llama"))
    ids, mask = prompts()
    eos = int(ee.generate(ids, mask, 4, max_new_tokens=20, ignore_eos=True).tokens[1, 5])
    ref = ee.generate(ids, mask, 4, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    got = Engine(ee).generate_speculative(ids, mask, 2, 4, max_new_tokens=20, eos_token_id=eos, pad_token_id=0,
                                          draft_threshold=0.0101)
    assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.n_tokens, ref.n_tokens)
    with pytest.raises(EarlyExitError, match="draft_threshold"):
        Engine(ee).generate_speculative(ids, mask, 2, 4, max_new_tokens=4, draft_threshold=1.5)


def test_self_speculative_stops_at_eos():
    ee = EarlyExitHead(tiny_model("llama"))
    ids, mask = prompts()
    eos = int(ee.generate(ids, mask, 4, max_new_tokens=20, ignore_eos=True).tokens[1, 5])
    ref = ee.generate(ids, mask, 4, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    got = Engine(ee).generate_speculative(ids, mask, 2, 4, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.n_tokens, ref.n_tokens)
    assert torch.equal(got.finished, ref.finished) and bool(got.finished[1])


def test_speculative_sampling_follows_the_full_model():
    """The speculative acceptance rule keeps the full model's distribution: the marginal of the second token,
    computed exactly from the full model, matches 6,000 speculative samples (draft from layer 1)."""
    ee = EarlyExitHead(tiny_model("llama"))
    prompt, temperature = torch.tensor([[5, 17, 42, 9]]), 0.05  # sharp enough that draft and target differ

    def probs(logits):
        logits = logits / temperature
        logits[..., 1] = float("-inf")  # EOS is banned (ignore_eos)
        return logits.softmax(-1)

    with torch.no_grad():
        first = probs(ee(prompt)[0, -1])  # p(t1)
        pairs = torch.cat([prompt.expand(128, -1), torch.arange(128)[:, None]], 1)
        exact = first @ probs(ee(pairs)[:, -1])  # sum over t1 of p(t1) p(t2 | t1)
    n = 6000
    torch.manual_seed(0)
    for threshold in (0.0, 0.5):  # plain and adaptive drafting
        got = Engine(ee).generate_speculative(prompt.expand(n, -1), torch.ones(n, 4, dtype=torch.long), 1, 2, max_new_tokens=2,
                                              ignore_eos=True, do_sample=True, temperature=temperature, draft_threshold=threshold)
        empirical = torch.bincount(got.tokens[:, 1], minlength=128).float() / n
        assert 0.05 < got.acceptance < 0.9
        assert 0.5 * (empirical - exact).abs().sum() < 0.05, threshold


@torch.no_grad()
def dynamic_reference(ee, ids, threshold, min_layer, steps, measure="softmax", check_every=1, probe=None, full_from=None):
    """CALM from scratch, batch 1, no cache, through the model's own forward: each step reruns the whole sequence,
    and hooks on the blocks feed every block above a generated token's exit that token's exit state (the
    propagation the engine implements) and pick the last position's exit. ``probe``: the learned measure's;
    ``full_from``: the token from which every token takes the last layer (the fallback)."""
    tokens, exits = list(ids[0].tolist()), []
    prompt = len(tokens)
    adapters = ee.adapters  # a shared exit block reads, at a check layer, every position's state there
    for step in range(steps):
        if full_from is not None and step >= full_from:
            threshold = 2.0
        length = len(tokens)
        frozen, chosen, inputs = {}, {}, {}  # position → exit state; the last position's exit; each block's input
        block_kwargs = {}

        def keep(_module, _args, kwargs):
            block_kwargs.update(kwargs)

        def before(layer):
            def hook(_module, args, kwargs):
                hidden = (args[0] if args else kwargs["hidden_states"]).clone()
                for position, state in frozen.items():
                    hidden[0, position] = state
                inputs[layer] = hidden
                return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            return hook

        def after(layer):
            def hook(_module, _args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                for position in range(prompt, length - 1):  # generated tokens keep the exit they took as last token
                    if exits[position - prompt + 1] == layer:
                        frozen[position] = hidden[0, position]
                checked = layer >= min_layer and (layer - min_layer) % check_every == 0
                if (checked or layer == ee.n_layers) and length - 1 not in frozen:
                    last = read = hidden[:, -1]
                    if adapters is not None and adapters.has_block(layer):  # positions exited below: their exit state
                        seq = hidden.clone()
                        for position, state in frozen.items():
                            seq[0, position] = state
                        read = adapters.run_block(seq, block_kwargs)[:, -1]
                    logits = ee.exit_logits(read)
                    logits[:, 1] = float("-inf")  # EOS is banned (ignore_eos)
                    if measure == "learned":
                        sure = layer < ee.n_layers and float(probe(last, layer)) >= threshold
                    else:
                        sure = float(confidence(logits, last, inputs[layer][:, -1], measure)) >= threshold
                    if layer == ee.n_layers or sure:
                        frozen[length - 1], chosen["layer"], chosen["read"] = last[0], layer, read[0]
            return hook

        handles = [ee.blocks[0].register_forward_pre_hook(keep, with_kwargs=True)]
        handles += [block.register_forward_pre_hook(before(i + 1), with_kwargs=True) for i, block in enumerate(ee.blocks)]
        handles += [block.register_forward_hook(after(i + 1)) for i, block in enumerate(ee.blocks)]
        try:
            ee.decoder(input_ids=torch.tensor([tokens]), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        logits = ee.exit_logits(chosen["read"])
        logits[1] = float("-inf")
        tokens.append(int(logits.argmax()))
        exits.append(chosen["layer"])
    return tokens[prompt:], exits  # exits[k]: the layer that chose token k (k = 0 from the prompt's last token)


@pytest.mark.parametrize("measure,threshold", [("softmax", 0.0105), ("state", 0.995)])
def test_dynamic_exit_propagates_the_exit_state_like_the_reference(measure, threshold):
    ee = EarlyExitHead(tiny_model("llama", seed=3))
    ids = torch.tensor([[5, 17, 42, 9, 33]])
    got = Engine(ee).generate_dynamic(ids, torch.ones_like(ids), threshold=threshold, min_layer=1, measure=measure,
                                      max_new_tokens=12, ignore_eos=True)
    tokens, exits = dynamic_reference(ee, ids, threshold, 1, 12, measure)
    assert got.tokens[0].tolist()[:12] == tokens[:12]
    assert got.layers[0].tolist() == exits
    assert len(set(exits)) > 1  # the threshold makes tokens exit at different layers


@pytest.mark.parametrize("fast", [True, False])
def test_dynamic_exit_at_sparse_check_layers_equals_the_reference(fast):
    ee = EarlyExitHead(tiny_model("llama", seed=3))
    ids = torch.tensor([[5, 17, 42, 9, 33]])
    got = Engine(ee, fast=fast).generate_dynamic(ids, torch.ones_like(ids), threshold=0.0105, min_layer=1, check_every=2,
                                                 max_new_tokens=12, ignore_eos=True)
    tokens, exits = dynamic_reference(ee, ids, 0.0105, 1, 12, check_every=2)
    assert got.tokens[0].tolist() == tokens and got.layers[0].tolist() == exits
    assert set(exits) <= {1, 3, 4} and len(set(exits)) > 1  # checks at 1 and 3; the last layer always exits


@pytest.mark.parametrize("fast", [True, False])
def test_dynamic_exit_at_listed_check_layers_equals_the_arithmetic_ones(fast):
    ee = EarlyExitHead(tiny_model("llama", seed=3))
    ids = torch.tensor([[5, 17, 42, 9, 33]])
    engine = Engine(ee, fast=fast)
    listed = engine.generate_dynamic(ids, torch.ones_like(ids), threshold=0.0105, check_layers=[3, 1], max_new_tokens=12,
                                     ignore_eos=True)
    spaced = engine.generate_dynamic(ids, torch.ones_like(ids), threshold=0.0105, min_layer=1, check_every=2,
                                     max_new_tokens=12, ignore_eos=True)
    assert torch.equal(listed.tokens, spaced.tokens) and torch.equal(listed.layers, spaced.layers)
    with pytest.raises(EarlyExitError, match="check_layers"):
        engine.generate_dynamic(ids, torch.ones_like(ids), check_layers=[2, 4], max_new_tokens=2)
    with pytest.raises(EarlyExitError, match="check_layers"):
        GenerationArgs(check_layers=[0, 2])


def test_dynamic_exit_skips_the_blocks_above_the_exit_and_defers_their_kv():
    """Threshold 0 at min_layer 2 of 4: after the prompt, blocks 3 and 4 never run; the K/V of their skipped positions
    wait and are filled together, 16 positions at a time, not once a token."""
    ee = EarlyExitHead(tiny_model("llama"))
    ids, mask = prompts()
    engine = Engine(ee, fast=True)
    calls = {"run": [0] * 4, "fill": []}
    engine.fast = [_Counting(block, i, calls) for i, block in enumerate(engine.fast)]
    engine.kv_fill = _CountingFill(engine.kv_fill, calls)
    out = engine.generate_dynamic(ids, mask, threshold=0.0, min_layer=2, max_new_tokens=20, ignore_eos=True)
    assert calls["run"] == [20, 20, 1, 1]  # the prompt, then 19 decode steps through blocks 1-2 only
    assert calls["fill"] == [(3, 4)]  # blocks 3-4's K/V of the first 16 steps, in one product
    assert torch.equal(out.tokens, ee.generate(ids, mask, 2, max_new_tokens=20, ignore_eos=True).tokens)
    assert (out.layers == 2).all()


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biases on q, k, v
def test_kv_fill_of_several_blocks_equals_the_keys_and_values_each_block_writes(family):
    """The batched fill of blocks 2..N for one input state writes what each block itself writes when it runs on that
    state, and leaves block 1's cache alone."""
    ee = EarlyExitHead(tiny_model(family, seed=2))
    engine = Engine(ee, fast=True)
    blocks, n = engine.fast, ee.n_layers
    hidden = torch.randn(3, 1, ee.config.hidden_size)
    slots = torch.tensor([[4], [6], [5]])
    rotary = ee.decoder.rotary_emb(hidden, position_ids=slots)
    stacked, single = StaticKV(8), StaticKV(8)
    stacked.stack(list(range(n)), 3, blocks[0].kv_heads, blocks[0].head_dim, torch.float32, "cpu")
    stacked.slots = single.slots = slots
    engine.kv_fill(hidden, rotary, stacked, 2, n)
    mask = torch.zeros(3, 1, 1, 8)
    for layer in range(2, n + 1):
        blocks[layer - 1](hidden, mask, rotary, single)  # the block itself, on that state
    assert not stacked.keys[0].any()  # block 1 untouched
    for layer in range(1, n):
        assert torch.allclose(stacked.keys[layer], single.keys[layer], atol=1e-6)
        assert torch.allclose(stacked.values[layer], single.values[layer], atol=1e-6)
        assert stacked.keys[layer][torch.arange(3), :, slots[:, 0]].abs().sum() > 0


class _CountingFill:
    """A K/V fill that records the blocks it fills."""

    def __init__(self, fill, calls):
        self.fill, self.calls = fill, calls
        self.kv_heads, self.head_dim = fill.kv_heads, fill.head_dim

    def __call__(self, *args, **kwargs):
        self.calls["fill"].append(args[3:5])
        return self.fill(*args, **kwargs)


class _Counting:
    """A fused block that counts its full runs."""

    def __init__(self, block, index, calls):
        self.block, self.index, self.calls = block, index, calls
        self.head_dim = block.head_dim

    def pair(self, *args):
        self.calls["run"][self.index] += 1
        return self.block.pair(*args)

    def __call__(self, *args):
        self.calls["run"][self.index] += 1
        return self.block(*args)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_skipping_equals_propagating_with_eos_and_padding(family):
    """A padded batch that stops at EOS: rows that have ended do not hold the others back, and the answers equal the
    propagating path's (every block run) token for token."""
    ee = EarlyExitHead(tiny_model(family, seed=5))
    ids, mask = prompts()
    fast, generic = Engine(ee, fast=True), Engine(ee, fast=False)
    eos = [int(t) for t in ee.generate(ids, mask, 4, max_new_tokens=4, ignore_eos=True).tokens[:, 2]]  # force early EOS
    for threshold, every in ((0.0105, 1), (0.0105, 2), (0.0, 1), (1.01, 1)):
        a = fast.generate_dynamic(ids, mask, threshold=threshold, min_layer=1, check_every=every, max_new_tokens=12,
                                  eos_token_id=eos)
        b = generic.generate_dynamic(ids, mask, threshold=threshold, min_layer=1, check_every=every, max_new_tokens=12,
                                     eos_token_id=eos)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.layers, b.layers) and torch.equal(a.n_tokens, b.n_tokens)
        assert (a.n_tokens < 12).any()


@pytest.mark.parametrize("defer", [16, 2])
def test_deferred_kv_is_filled_before_a_later_token_reads_it(defer, monkeypatch):
    """40 tokens, exits mixed over the check layers: positions that skipped the blocks above wait (for 2 steps at most:
    the host's flush keeps a run of skips from overwriting them) and a token that goes on reads their K/V as if filled
    at once: the skipping path gives the propagating path's tokens and layers."""
    import earlyexit.engine.core as core
    import earlyexit.engine.dynamic as dynamic

    monkeypatch.setattr(core, "DEFER", defer)
    monkeypatch.setattr(dynamic, "DEFER", defer)
    ee = EarlyExitHead(tiny_model("llama", seed=2))
    ids, mask = prompts()
    ids, mask = ids[:1], mask[:1]  # one row: runs of skipped steps (a batch skips only when every row exits)
    common = dict(threshold=0.0102, min_layer=1, max_new_tokens=40, ignore_eos=True)
    caches, init = [], StaticKV.__init__
    monkeypatch.setattr(StaticKV, "__init__", lambda cache, capacity: (caches.append(cache), init(cache, capacity))[1])
    a = Engine(ee, fast=True).generate_dynamic(ids, mask, **common)
    b = Engine(ee, fast=False).generate_dynamic(ids, mask, **common)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.layers, b.layers)
    # every position a later token read holds the keys and values the propagating path computed, in every block
    last = max(t for t, layer in enumerate(a.layers[0].tolist()) if layer > 1)  # the last step that ran block 2
    seen = ids.shape[1] + last - 1  # the slots before its input's
    skipping, propagating = caches
    for layer in range(ee.n_layers):
        assert torch.allclose(skipping.keys[layer][..., :seen, :], propagating.keys[layer][..., :seen, :], atol=1e-5), layer
        assert torch.allclose(skipping.values[layer][..., :seen, :], propagating.values[layer][..., :seen, :], atol=1e-5)
    runs = "".join("s" if layer < 4 else "." for layer in a.layers[0, 1:].tolist())
    assert "sss." in runs and ".s" in runs, runs  # three skips in a row, then a token that reads their K/V


def test_the_fallback_fills_the_waiting_kv_and_then_runs_full_depths_own_step(monkeypatch):
    """The fallback (forced here: on the CPU nothing is timed) switches after the first stretch of 16 steps, where
    skipped positions still wait for their K/V above the exit: they are filled once, and from then on full depth's
    own step runs (no checks, no deferral); the answer is the reference's with every token after the switch at the
    last layer."""
    import earlyexit.engine.core as core

    class Slower:  # every stretch reads slower than full depth
        def restart(self):
            pass

        def seconds(self):
            return 1.0

    monkeypatch.setattr(Engine, "falls_back", lambda self, args: True)
    monkeypatch.setattr(Engine, "_time", lambda self, step, state, repeats=10: 0.0)
    monkeypatch.setattr(core, "Stretch", Slower)
    ee = EarlyExitHead(tiny_model("llama", seed=2))
    ids = torch.tensor([[5, 17, 42, 9, 33]])
    got = Engine(ee, fast=True).generate_dynamic(ids, torch.ones_like(ids), threshold=0.0102, min_layer=1,
                                                 max_new_tokens=40, ignore_eos=True)
    switch = core.SYNC_EVERY + 1
    assert got.full_from == switch
    tokens, exits = dynamic_reference(ee, ids, 0.0102, 1, 40, full_from=switch)
    assert got.tokens[0].tolist() == tokens and got.layers[0].tolist() == exits
    assert set(exits[switch:]) == {4} and exits[switch - 1] < 4 and min(exits[:switch]) < 4  # skipped steps waited


@pytest.mark.parametrize("shared", [False, True])
def test_speculation_falls_back_to_full_depths_own_step_and_keeps_its_text(shared, monkeypatch):
    """Speculation's fallback (forced here after the first look, 4 cycles) decodes the rest of each answer with full
    depth's own step, one token a running row: the text stays full depth's, rows stop at EOS and at the length limit,
    and ``full_from`` is the longest row's count at the switch."""
    import earlyexit.engine.speculative as speculative

    class Slower:  # every stretch of cycles made fewer tokens than full depth would have
        def restart(self):
            pass

        def seconds(self):
            return 1.0

    monkeypatch.setattr(Engine, "falls_back", lambda self, args: True)
    monkeypatch.setattr(Engine, "_time", lambda self, step, state, repeats=10: 1e-6)
    monkeypatch.setattr(speculative, "Stretch", Slower)
    model = tiny_model("llama", seed=2)
    if shared:
        from earlyexit.adapters import block_template

        adapters = ExitAdapters([2], model.config.hidden_size, kind="block", template=block_template(model))
        torch.manual_seed(0)
        for param in adapters.parameters():
            torch.nn.init.normal_(param, std=0.05)
        attach(model, adapters)
    ee = EarlyExitHead(model)
    ids, mask = prompts()
    engine = Engine(ee, fast=True)
    full = engine.generate(ids, mask, [4], max_new_tokens=24, eos_token_id=7, pad_token_id=0)[4]
    spec = engine.generate_speculative(ids, mask, 2, 2, max_new_tokens=24, eos_token_id=7, pad_token_id=0)
    assert spec.full_from is not None and 0 < spec.full_from < 24 and spec.cycles > 4
    assert torch.equal(spec.tokens, full.tokens) and torch.equal(spec.n_tokens, full.n_tokens)


def test_the_fallback_judges_the_answer_so_far_not_a_stretch_alone():
    """Speculation at acceptance 0.84 (d = 1), each cycle 1.55 full-depth steps: 1.19x full depth on average, but
    one look in eight (4 cycles) makes fewer tokens than full depth would have. Judged a stretch at a time (the old
    rule) most answers switched to full depth; summed over the answer (Behind) almost none do. A mode 10% slower
    than full depth still switches at its first look (16 steps), and a slower one loses at most the margin and one
    stretch."""
    from earlyexit.engine.core import FALLBACK_MARGIN, SYNC_EVERY, Behind

    generator = torch.Generator().manual_seed(0)
    step, cycle, looks = 1e-3, 1.55e-3, 16  # 16 looks of 4 cycles: about 118 tokens an answer
    accepted = torch.rand(200, looks, 4, generator=generator) < 0.84
    tokens = (1 + accepted.float()).sum(-1)  # a row's tokens in each look
    stretch_alone = sum(bool((tokens[a] < 4 * cycle / step).any()) for a in range(200))
    summed = 0
    for answer in tokens:
        behind = Behind(step)
        summed += any(behind.add(4 * cycle, float(made)) for made in answer)
    assert stretch_alone > 100 and summed < 10, (stretch_alone, summed)

    slower = Behind(step)  # every step 10% slower: 1.6 steps behind after the first look
    assert slower.add(SYNC_EVERY * 1.1 * step, SYNC_EVERY)
    ahead = Behind(step)  # ahead by 4 steps, then one stretch 3 steps behind: still ahead
    assert not ahead.add(SYNC_EVERY * step - 4 * step, SYNC_EVERY) and not ahead.add(SYNC_EVERY * step + 3 * step, SYNC_EVERY)
    assert ahead.add(SYNC_EVERY * step + 2.5 * step, SYNC_EVERY)  # 1.5 steps behind over the answer: past the margin
    assert FALLBACK_MARGIN == 1.0


@pytest.mark.parametrize("measure", ["softmax", "margin", "state"])
def test_dynamic_threshold_zero_is_the_minimum_layer_and_unreachable_is_full_depth(tiny, measure):
    ee = EarlyExitHead(tiny)
    ids, mask = prompts()
    engine = Engine(ee)
    at_min = engine.generate_dynamic(ids, mask, threshold=0.0, min_layer=2, measure=measure, max_new_tokens=10, ignore_eos=True)
    assert torch.equal(at_min.tokens, ee.generate(ids, mask, 2, max_new_tokens=10, ignore_eos=True).tokens)
    assert (at_min.layers == 2).all()
    full = engine.generate_dynamic(ids, mask, threshold=1.01, min_layer=2, measure=measure, max_new_tokens=10, ignore_eos=True)
    assert torch.equal(full.tokens, ee.generate(ids, mask, 4, max_new_tokens=10, ignore_eos=True).tokens)
    assert (full.layers == 4).all()


def test_confidence_measures():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]))
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(confidence(logits, hidden, hidden, "softmax"), torch.tensor([0.7, 0.4]))
    assert torch.allclose(confidence(logits, hidden, hidden, "margin"), torch.tensor([0.5, 0.0]), atol=1e-6)
    assert torch.allclose(confidence(None, hidden, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), "state"), torch.tensor([1.0, 0.5]))


def test_masks_follow_slots_padding_and_windows():
    valid = torch.tensor([[False, True, True, True, True]])
    mask = additive_mask(torch.tensor([[3]]), valid, None, torch.float32)
    assert (mask[0, 0, 0] == 0).tolist() == [False, True, True, True, False]
    windowed = additive_mask(torch.tensor([[4]]), valid, 2, torch.float32)
    assert (windowed[0, 0, 0] == 0).tolist() == [False, False, False, True, True]
    assert sliding_windows(tiny_model("gemma2").config) == [8, None, 8, None]
    assert sliding_windows(tiny_model("mistral").config) == [8] * 4
    assert sliding_windows(tiny_model("qwen2").config) == [None] * 4


def test_nucleus_keeps_the_top_p_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(nucleus(logits, 0.7))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(nucleus(logits, 0.1))[0].tolist() == [True, False, False, False]


def test_bad_arguments_are_refused():
    ee = EarlyExitHead(tiny_model("llama"))
    ids, mask = prompts()
    engine = Engine(ee)
    with pytest.raises(EarlyExitError, match="below the last layer"):
        engine.generate_speculative(ids, mask, 4)
    with pytest.raises(EarlyExitError, match="n_draft"):
        engine.generate_speculative(ids, mask, 2, 0)
    with pytest.raises(EarlyExitError, match="out of range"):
        engine.generate(ids, mask, [5])
    with pytest.raises(EarlyExitError, match="measure"):
        engine.generate_dynamic(ids, mask, threshold=0.5, measure="entropy")
    with pytest.raises(EarlyExitError, match="GPU"):
        Engine(ee, cuda_graphs=True)


def test_every_mode_takes_one_options_object_and_keyword_changes():
    ee = EarlyExitHead(tiny_model("llama"))
    ids, mask = prompts()
    engine, options = Engine(ee), GenerationArgs(max_new_tokens=6, threshold=0.0, min_layer=2)
    assert torch.equal(engine.generate(ids, mask, [2], options, ignore_eos=True)[2].tokens,
                       engine.generate(ids, mask, [2], max_new_tokens=6, ignore_eos=True)[2].tokens)
    assert engine.generate_dynamic(ids, mask, options, ignore_eos=True).tokens.shape == (3, 6)
    assert engine.generate_speculative(ids, mask, 2, 2, options, ignore_eos=True).tokens.shape == (3, 6)
    assert ee.generate(ids, mask, 2, options, ignore_eos=True).tokens.shape == (3, 6)
    with pytest.raises(EarlyExitError, match="generation.top_p = 2 is out of range"):
        engine.generate(ids, mask, [2], options, top_p=2)


# --- the fast path for llama-style blocks --------------------------------------------------------------

FAST_FAMILIES = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_fast_path_equals_the_generic_path_in_every_mode(family):
    """float32, a padded batch of three prompt lengths, 12 tokens (past the sliding windows of 8)."""
    ee = EarlyExitHead(tiny_model(family, seed=2))
    ids, mask = prompts()
    generic, fast = Engine(ee, fast=False), Engine(ee, fast=True)
    assert generic.fast is None and fast.fast is not None
    options = GenerationArgs(max_new_tokens=12)
    for engine_out, reference in [
        (fast.generate(ids, mask, [1, 2, 3, 4], options, ignore_eos=True), generic.generate(ids, mask, [1, 2, 3, 4], options, ignore_eos=True)),
    ]:
        for layer in (1, 2, 3, 4):
            assert torch.equal(engine_out[layer].tokens, reference[layer].tokens), layer
    assert torch.equal(fast.generate(ids, mask, [3], options, ignore_eos=True)[3].tokens,
                       generic.generate(ids, mask, [3], options, ignore_eos=True)[3].tokens)
    for threshold in (0.0, 0.0105, 1.01):
        a = fast.generate_dynamic(ids, mask, options, threshold=threshold, min_layer=2, ignore_eos=True)
        b = generic.generate_dynamic(ids, mask, options, threshold=threshold, min_layer=2, ignore_eos=True)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.layers, b.layers), threshold
    for draft_layer, n_draft in ((1, 2), (2, 4)):
        a = fast.generate_speculative(ids, mask, draft_layer, n_draft, options, ignore_eos=True)
        b = generic.generate_speculative(ids, mask, draft_layer, n_draft, options, ignore_eos=True)
        assert torch.equal(a.tokens, b.tokens) and a.accepted == b.accepted
    full = ee.generate(ids, mask, 4, options, ignore_eos=True)  # the model's own generate, on the shared weights
    assert torch.equal(fast.generate(ids, mask, [4], options, ignore_eos=True)[4].tokens, full.tokens)


def test_fast_path_keeps_no_second_copy_of_the_weights():
    ee = EarlyExitHead(tiny_model("llama"))
    before = sum(p.numel() for p in ee.parameters())
    engine = Engine(ee, fast=True)
    attn, mlp, fused = ee.blocks[0].self_attn, ee.blocks[0].mlp, engine.fast[0]
    assert attn.q_proj.weight.data_ptr() == fused.wqkv.data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fused.wqkv.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == fused.wgu.untyped_storage().data_ptr()
    assert sum(p.numel() for p in ee.parameters()) == before


def test_fast_path_merges_lora_adapters_first():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lm = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    for name, param in lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # an adapter that changes the answers
    ee = EarlyExitHead(lm)
    ids, mask = prompts()
    unmerged = Engine(ee, fast=False).generate(ids, mask, [2, 4], max_new_tokens=8, ignore_eos=True)
    fast = Engine(ee, fast=True).generate(ids, mask, [2, 4], max_new_tokens=8, ignore_eos=True)
    for layer in (2, 4):
        assert torch.equal(fast[layer].tokens, unmerged[layer].tokens)


def test_fast_path_is_refused_for_other_families():
    with pytest.raises(EarlyExitError, match="no fast path for gpt2 blocks: it serves llama-style families"):
        Engine(EarlyExitHead(tiny_model("gpt2")), fast=True)
    assert Engine(EarlyExitHead(tiny_model("gpt2"))).fast is None  # automatic: the generic path


@pytest.mark.parametrize("compile_mode", ["auto", "default"])
def test_compiled_engine_equals_the_eager_engine(compile_mode):
    """The compiled decode step (blocks, inputs and head) gives the eager step's tokens, fast path and adapters on."""
    model = tiny_model("llama", seed=2)
    adapters = ExitAdapters([2], model.config.hidden_size)
    torch.nn.init.normal_(adapters.maps["2"].weight, std=0.3)
    attach(model, adapters)
    ee = EarlyExitHead(model)
    ids, mask = prompts()
    eager = Engine(ee).generate(ids, mask, [2, 4], max_new_tokens=10, ignore_eos=True)
    compiled = Engine(ee, compile=True, compile_mode=compile_mode).generate(ids, mask, [2, 4], max_new_tokens=10, ignore_eos=True)
    for layer in (2, 4):
        assert torch.equal(compiled[layer].tokens, eager[layer].tokens), layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cuda_graphs_equal_the_eager_engine_in_every_mode(family):
    """On a GPU, float32: CUDA graphs (the decode step and, on the fast path, the prompt pass) give the eager engine's
    tokens in every mode, on the first call of a shape and on its replays."""
    ee = EarlyExitHead(tiny_model(family, seed=2).cuda())
    ids, mask = prompts()
    eager, graphed = Engine(ee, cuda_graphs=False), Engine(ee, cuda_graphs=True)
    options = GenerationArgs(max_new_tokens=12, schedule="all", fallback=False)  # the modes as asked, however fast
    for _ in range(2):  # the second call replays the first call's graphs
        a, b = (e.generate(ids, mask, [2, 4], options, ignore_eos=True) for e in (eager, graphed))
        assert all(torch.equal(a[layer].tokens, b[layer].tokens) for layer in (2, 4))
        for threshold in (0.0, 0.0105, 1.01):
            a, b = (e.generate_dynamic(ids, mask, options, threshold=threshold, min_layer=2, ignore_eos=True)
                    for e in (eager, graphed))
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.layers, b.layers), threshold
        a, b = (e.generate_speculative(ids, mask, 2, 3, options, ignore_eos=True) for e in (eager, graphed))
        assert torch.equal(a.tokens, b.tokens) and a.accepted == b.accepted
    short = prompts(seed=3)  # another batch of the same shape: the replayed prompt pass reads its new ids
    a, b = (e.generate(*short, [4], options, ignore_eos=True)[4].tokens for e in (eager, graphed))
    assert torch.equal(a, b)


def test_one_process_runs_every_mode_and_setting_without_recompiling(monkeypatch, tmp_path):
    """Compile once: each decode piece is a pure function of tensors (a block, a check, a fill) whose layer and threshold
    are data, so the first pass over every mode compiles each piece once per shape, and a second pass with other
    thresholds and measures compiles nothing (dynamo's own count; its eager backend keeps the test fast)."""
    import earlyexit.engine.core as core
    from earlyexit.probe import forced_probe
    from torch._dynamo.utils import counters
    from test_adapters import shared
    from test_probe import random_probe, saved

    torch._dynamo.reset()
    monkeypatch.setattr(core, "_COMPILED", {}, raising=False)
    monkeypatch.setattr(core, "compiler", lambda mode, hidden_size: {"backend": "eager"})
    ee = shared("llama", seed=4, std=0.05)
    probe = saved(random_probe([1, 2, 3], ee.config.hidden_size, seed=2, std=0.1, bias=[-0.3, 0.0, 0.5]), tmp_path)
    forced = {layer: forced_probe([1, 2, 3], ee.config.hidden_size, layer, tmp_path / f"at{layer}") for layer in (1, 2, 3, None)}
    ids, mask = prompts()
    engine = Engine(ee, compile=True)
    common = dict(max_new_tokens=8, ignore_eos=True, check_layers=[1, 2, 3])

    def sweep(thresholds):
        engine.generate(ids, mask, [4], max_new_tokens=8, ignore_eos=True)
        engine.generate(ids, mask, [2, 4], max_new_tokens=8, ignore_eos=True)
        engine.generate_speculative(ids, mask, 2, 2, max_new_tokens=8, ignore_eos=True)
        for threshold in thresholds:
            for measure in ("softmax", "margin", "state"):
                engine.generate_dynamic(ids, mask, threshold=threshold, measure=measure, **common)
            engine.generate_dynamic(ids, mask, threshold=threshold, measure="learned", probe=probe, **common)

    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    before = graphs()
    for where in forced.values():  # every fill (all rows out at 1, 2, 3) and the full depth
        engine.generate_dynamic(ids, mask, threshold=0.5, measure="learned", probe=where, **common)
    sweep([0.0, 0.5, 1.01])
    first = graphs() - before
    sweep([0.01, 0.2, 0.7, 0.9, 0.99])
    assert graphs() - before == first  # nothing new: not a layer, not a threshold, not a measure seen before
    assert first <= 40, first


def test_a_schedule_checks_the_subset_of_check_layers_that_ran_fastest_and_speculates_only_where_it_pays(monkeypatch):
    """generation.schedule auto (forced on here: on the CPU nothing is timed): every subset of the check layers, and none
    (full depth), decodes batches of the calibration prompts once to build and twice timed; the fastest a token is
    checked from then on, and its answer is that subset's; speculation is kept only where it beat full depth."""
    import earlyexit.engine.core as core

    ee = EarlyExitHead(tiny_model("llama", seed=3))
    ids, mask = prompts()
    more, more_mask = prompts(seed=2)
    calibration = (torch.cat([ids.flip(0), more, more[:1]]), torch.cat([mask.flip(0), more_mask, more_mask[:1]]))  # 7 rows
    engine = Engine(ee)
    monkeypatch.setattr(Engine, "schedules", lambda self, args: True)
    clock, costs, seen = [0.0], {(): 9.0, (2,): 1.0}, []
    dynamic, speculative = Engine._dynamic, Engine._speculative

    def timed_dynamic(self, ids, mask, args, checks, stops):
        clock[0] += costs.get(checks, 5.0)
        seen.append((checks, ids))
        return dynamic(self, ids, mask, args, checks, stops)

    def timed_speculative(self, *args):
        clock[0] += 1.0 if args[-1] else 2.0  # speculation beats full depth here
        return speculative(self, *args)

    monkeypatch.setattr(core.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(Engine, "_dynamic", timed_dynamic)
    monkeypatch.setattr(Engine, "_speculative", timed_speculative)
    common = dict(threshold=0.0105, check_layers=[1, 2, 3], max_new_tokens=8, ignore_eos=True)
    out = engine.generate_dynamic(ids, mask, calibration=calibration, **common)
    timed = [checks for checks, prompts_ in seen[:-1]]
    assert sorted(set(timed)) == sorted([(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)])
    assert all(timed.count(subset) == 3 * 2 for subset in set(timed))  # built once, timed twice; 2 batches of 3 rows
    cal_ids = engine._shape(*calibration)[0]
    assert all(torch.equal(p, cal_ids[:3]) or torch.equal(p, cal_ids[3:6]) for _, p in seen[:-1])
    assert seen[-1][1] is not cal_ids and out.checks == (2,) and set(out.layers[:, 1:].unique().tolist()) <= {2, 4}
    assert engine.calibrations[next(iter(engine.calibrations))][(2,)] == 1.0 / 24  # seconds a token: 3 rows × 8
    depths = engine.calibration_depths[next(iter(engine.calibrations))]  # and layers a token, as the answers ran
    assert depths[()] == 4 and 2 <= depths[(2,)] <= 4 and set(depths) == set(timed)
    alone = engine.generate_dynamic(ids, mask, schedule="all", **{**common, "check_layers": [2]})
    assert torch.equal(out.tokens, alone.tokens) and torch.equal(out.layers, alone.layers)
    seen.clear()
    again = engine.generate_dynamic(ids, mask, calibration=calibration, **common)
    assert [checks for checks, _ in seen] == [(2,)] and torch.equal(again.tokens, out.tokens)  # timed once a setting
    costs[()] = 0.5  # another threshold, where no check pays: full depth's own answer
    none = engine.generate_dynamic(ids, mask, calibration=calibration, **{**common, "threshold": 0.3})
    assert none.checks == () and (none.layers[:, 1:] == 4).all()
    assert torch.equal(none.tokens, engine.generate(ids, mask, [4], max_new_tokens=8, ignore_eos=True)[4].tokens)
    costs.update({(): 1.0, (2,): 0.98})  # a check 2% faster on the calibration prompts is within the margin: full depth
    assert engine.generate_dynamic(ids, mask, calibration=calibration, **{**common, "threshold": 0.4}).checks == ()
    spec = engine.generate_speculative(ids, mask, 2, 2, max_new_tokens=8, ignore_eos=True)
    assert spec.cycles > 0 and spec.full_from is None
    monkeypatch.setattr(Engine, "_speculative", lambda self, *args: (clock.__setitem__(0, clock[0] + (2.0 if args[-1] else 1.0)),
                                                                     speculative(self, *args))[1])
    slower = engine.generate_speculative(ids, mask, 3, 2, max_new_tokens=8, ignore_eos=True)
    assert slower.full_from == 0 and slower.cycles == 0 and torch.equal(slower.tokens, none.tokens)


def test_a_scheduled_choice_that_keeps_falling_back_runs_full_depth(monkeypatch):
    """The calibration prompts can flatter a setting (at batch 8 a check chosen on 16 prompts fell back on most answers
    of 200 records): once its fallback took over in most of its last RESCHEDULE_CALLS calls, the setting runs full depth,
    and an occasional fallback changes nothing."""
    import dataclasses

    import earlyexit.engine.core as core

    ee = EarlyExitHead(tiny_model("llama", seed=3))
    ids, mask = prompts()
    engine = Engine(ee)
    monkeypatch.setattr(Engine, "schedules", lambda self, args: True)
    clock, ran, falls = [0.0], [], iter([])
    dynamic = Engine._dynamic

    def timed(self, ids, mask, args, checks, stops):  # (2,) wins the calibration; the calls say whether it fell back
        clock[0] += 1.0 if checks == (2,) else 5.0
        ran.append(checks)
        out = dynamic(self, ids, mask, args, checks, stops)
        return dataclasses.replace(out, full_from=3 if checks and next(falls, False) else None)

    monkeypatch.setattr(core.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(Engine, "_dynamic", timed)
    common = dict(threshold=0.0105, check_layers=[1, 2, 3], max_new_tokens=4, ignore_eos=True)
    engine.generate_dynamic(ids, mask, **common)  # the calibration (falls is empty: nothing falls back there)
    calls = core.RESCHEDULE_CALLS
    falls = iter([True, False] * calls)  # half of the calls fall back: kept
    for _ in range(2 * calls):
        assert engine.generate_dynamic(ids, mask, **common).checks == (2,)
    falls = iter([True] * calls)  # with the deque's half, 3 in 4 of the last calls fall back after calls // 2 more
    outs = [engine.generate_dynamic(ids, mask, **common) for _ in range(calls)]
    switched = next(i for i, out in enumerate(outs) if out.checks == ())
    assert 0 < switched < calls and all(out.checks == () for out in outs[switched:])
    assert (outs[-1].layers[:, 1:] == 4).all() and ran[-1] == ()
    assert engine.calibrations[next(iter(engine.calibrations))]["fell back"] >= core.RESCHEDULE_SHARE


def test_a_schedule_keeps_the_programs_of_the_callers_own_shapes(monkeypatch):
    """Timing a schedule builds a program per candidate: they are dropped after, and never push out the programs
    the caller's own calls built (a sweep at batch 32 whose last batch of 8 rows calibrated anew rebuilt, in its timed
    pass, every program of the batches of 32)."""
    from earlyexit.engine.core import KEEP_PROGRAMS

    ee = EarlyExitHead(tiny_model("llama", seed=3))
    ids, mask = prompts()
    engine = Engine(ee)
    monkeypatch.setattr(Engine, "schedules", lambda self, args: True)
    for layers in ([1], [2], [3], [4], [1, 2], [1, 3], [1, 4], [2, 3])[:KEEP_PROGRAMS]:
        engine.generate(ids, mask, layers, max_new_tokens=2, ignore_eos=True)
    kept = list(engine._programs)
    engine.generate_dynamic(ids[:2], mask[:2], threshold=0.5, check_layers=[1, 2, 3], max_new_tokens=2, ignore_eos=True)
    assert engine.programs == KEEP_PROGRAMS
    assert [key for key in kept if key not in engine._programs] == kept[:1]  # only the oldest, for the call's own program


