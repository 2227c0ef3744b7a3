"""Exit adapters: identity at initialisation, the same maths on every decode path, saved and loaded with the
adapter, and trainable alone on a frozen model."""

import pytest
import torch
from torch.testing import assert_close

from earlyexit.adapters import ExitAdapters, attach
from earlyexit.engine import Engine
from earlyexit.loading import ModelArgs, load_model
from earlyexit.model import EarlyExitHead
from tiny import tiny_model


def adapted(model_type: str = "llama", layers=(1, 2, 3), rank=None, seed: int = 0, kind: str = "affine") -> EarlyExitHead:
    """A tiny model with exit adapters that change its answers (random maps instead of the zero start)."""
    model = tiny_model(model_type)
    adapters = ExitAdapters(list(layers), model.config.hidden_size, rank, kind)
    torch.manual_seed(seed)
    for param in adapters.parameters():
        torch.nn.init.normal_(param, std=0.3)
    attach(model, adapters)
    return EarlyExitHead(model)


def prompts(length: int = 7):
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (3, length))
    mask = torch.ones_like(ids)
    mask[1, :3], mask[2, :5] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("kind", ["affine", "mlp"])
def test_untrained_adapters_are_the_identity(kind):
    model = tiny_model("llama")
    ee = EarlyExitHead(model)
    ids = torch.randint(3, 100, (2, 6))
    before = {layer: ee(ids, exit_layer=layer) for layer in (1, 2, 4)}
    attach(model, ExitAdapters([1, 2, 3], model.config.hidden_size, kind=kind))
    for layer, logits in before.items():
        assert_close(ee(ids, exit_layer=layer), logits)


def test_exit_logits_apply_the_adapter_before_the_shared_norm_and_head():
    ee = adapted(rank=None)
    ids = torch.randint(3, 100, (2, 6))
    hidden = ee.hidden_states(ids)
    adapter = ee.adapters.maps["2"]
    h = hidden[2]
    assert_close(ee.exit_logits(h, 2), ee.head(ee.norm(h + adapter(h))))
    assert_close(ee(ids, exit_layer=2), ee.exit_logits(h, 2))  # the truncated forward (generate's path) agrees
    assert_close(ee.exit_logits(hidden[4], 4), ee(ids))  # the last layer has no adapter: the model's own output
    assert not torch.allclose(ee.exit_logits(h, 2), ee.exit_logits(h))


@pytest.mark.parametrize("kind", ["affine", "mlp"])
def test_every_engine_mode_uses_the_adapters(kind):
    for model_type in ("llama", "gpt2"):  # the fast path and the generic path
        ee = adapted(model_type, rank=8 if model_type == "gpt2" else None, kind=kind)
        ids, mask = prompts()
        engine = Engine(ee)
        got = engine.generate(ids, mask, [1, 2, 3, 4], max_new_tokens=10, ignore_eos=True)
        for layer in (1, 2, 3, 4):
            ref = ee.generate(ids, mask, layer, max_new_tokens=10, ignore_eos=True)
            assert torch.equal(got[layer].tokens, ref.tokens), (model_type, layer)
        at_min = engine.generate_dynamic(ids, mask, threshold=0.0, min_layer=2, max_new_tokens=10, ignore_eos=True)
        assert torch.equal(at_min.tokens, got[2].tokens)
        spec = engine.generate_speculative(ids, mask, 2, 3, max_new_tokens=10, ignore_eos=True)
        assert torch.equal(spec.tokens, got[4].tokens)  # exact: the drafts (exit 2, adapted) only propose


@pytest.mark.parametrize("kind", ["affine", "mlp"])
def test_adapters_are_saved_and_loaded_with_the_adapter(tiny_dir, tmp_path, kind):
    model, _ = load_model(ModelArgs(name=tiny_dir, device="cpu"))
    adapters = ExitAdapters([2], model.config.hidden_size, rank=4, kind=kind)
    for param in adapters.parameters():
        torch.nn.init.normal_(param, std=0.3)
    attach(model, adapters)
    adapters.save(tmp_path / "adapter")
    loaded, _ = load_model(ModelArgs(name=tiny_dir, device="cpu", adapter=str(tmp_path / "adapter")))
    ids = torch.randint(3, 100, (2, 6))
    assert_close(EarlyExitHead(loaded)(ids, exit_layer=2), EarlyExitHead(model)(ids, exit_layer=2))


def train_steps(module, steps: int) -> tuple[dict, float, float]:
    """``steps`` AdamW steps (lr 1e-2) of ``module`` on one fixed batch of random tokens: the batch, first and last loss."""
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (4, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = module.training_step(batch, 0)
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return batch, losses[0], losses[-1]


def test_adapters_alone_train_on_a_frozen_model(tiny_dir):
    from earlyexit.module import EarlyExitModule, ExitAdapterArgs, ExitLossArgs, OptimArgs

    module = EarlyExitModule(base=ModelArgs(name=tiny_dir, device="cpu"), exit_adapters=ExitAdapterArgs(exit_layers="all"),
                             loss=ExitLossArgs(exit_layers="all", distill=1.0), optim=OptimArgs(lr=1e-2, warmup_steps=0))
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("exit_adapters" in name for name in trainable)
    frozen = {name: p.detach().clone() for name, p in module.named_parameters() if not p.requires_grad}
    batch, first, last = train_steps(module, 30)
    ids = batch["input_ids"]
    assert last < 0.7 * first  # KL(final ‖ exit) of the early exits falls
    assert all(torch.equal(p, frozen[name]) for name, p in module.named_parameters() if not p.requires_grad)
    # the teacher of a frozen trunk is the training pass's own last layer: no second forward
    hidden = module.ee.hidden_states(ids, torch.ones_like(ids))
    assert_close(module._teacher(batch, hidden), module._teacher(batch))


def test_the_train_command_exports_exit_adapters_that_evaluate_reads(tiny_dir, tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from earlyexit import evaluate, train

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"It is {i}."} for i in range(40)]))
    train.main(["--config", str(root / "configs" / "debug.yaml"), "--model.base.name", tiny_dir, "--model.lora", "null",
                "--model.exit_adapters", "{exit_layers: all}", "--model.layer_dropout.p_max", "0", "--model.optim.lr", "0.05",
                "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--data.source", str(data),
                "--data.eval_size", "4", "--data.val_size", "4", "--trainer.default_root_dir", str(tmp_path / "run")])
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "exit_adapters.safetensors").is_file() and not (adapter / "adapter_config.json").exists()
    args = ["--model.name", tiny_dir, "--model.device", "cpu", "--data.source", str(data), "--data.limit", "2",
            "--generation.max_new_tokens", "4", "--metrics.names", "[bleu]", "--metrics.bootstrap", "0", "--exit_layers", "all"]
    evaluate.main([*args, "--out_dir", str(tmp_path / "base")])
    evaluate.main([*args, "--model.adapter", str(adapter), "--out_dir", str(tmp_path / "adapted")])
    rows = lambda d: {(r["id"], r["layer"]): r["tokens"] for r in map(json.loads, (d / "generations.jsonl").read_text().splitlines())}  # noqa: E731
    base, tuned = rows(tmp_path / "base"), rows(tmp_path / "adapted")
    assert all(base[k] == tuned[k] for k in base if k[1] == 4)  # the last layer is the model's own
    assert any(base[k] != tuned[k] for k in base if k[1] < 4)  # the adapted exits answer differently


def test_the_lens_reads_the_exits_through_their_adapters():
    from earlyexit.lens import layer_log_probs

    ee = adapted()
    ids = torch.randint(3, 100, (1, 6))
    hidden = ee.hidden_states(ids)
    assert_close(layer_log_probs(ee, hidden[2], 2), torch.log_softmax(ee(ids, exit_layer=2).float(), -1))


def test_adapters_beside_lora_take_their_own_learning_rate(tiny_dir):
    from earlyexit.module import EarlyExitModule, ExitAdapterArgs, LoraArgs, OptimArgs

    module = EarlyExitModule(base=ModelArgs(name=tiny_dir, device="cpu"), lora=LoraArgs(r=2), exit_adapters=ExitAdapterArgs(),
                             optim=OptimArgs(lr=1e-4, adapter_lr=1e-2))
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    optimizer = module.configure_optimizers()["optimizer"]
    lrs = {id(p): group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert lrs[id(p)] == (1e-2 if "exit_adapters." in name else 1e-4), name


# --- the shared exit block (Kangaroo) ----------------------------------------------------------------------


def shared(model_type: str = "llama", layers=(1, 2, 3), seed: int = 0, start: bool = False, std: float = 0.2) -> EarlyExitHead:
    """A tiny model with a shared exit block; ``start``: as initialised (identity), else with random weights."""
    from earlyexit.adapters import block_template

    model = tiny_model(model_type)
    adapters = ExitAdapters(list(layers), model.config.hidden_size, kind="block", template=block_template(model))
    if not start:
        torch.manual_seed(seed)
        for param in adapters.parameters():
            torch.nn.init.normal_(param, std=std)
    attach(model, adapters)
    return EarlyExitHead(model)


SHARED_FAMILIES = ["llama", "mistral", "qwen2", "gemma3_text"]  # Gemma 3: sliding and global blocks


@pytest.mark.parametrize("model_type", SHARED_FAMILIES)
def test_an_untrained_shared_block_is_the_identity(model_type):
    ee = shared(model_type, start=True)
    plain = EarlyExitHead(tiny_model(model_type))
    ids = torch.randint(3, 100, (2, 6))
    hidden, reference = ee.hidden_states(ids), plain.hidden_states(ids)
    for layer in (1, 2, 4):
        assert_close(ee(ids, exit_layer=layer), plain(ids, exit_layer=layer))
        assert_close(ee.exit_logits(hidden[layer], layer), plain.exit_logits(reference[layer], layer))


@pytest.mark.parametrize("model_type", SHARED_FAMILIES)
def test_the_shared_block_reads_the_exit_with_attention_the_same_way_in_training_and_decoding(model_type):
    """hidden_states (training, the loss) and the truncated model with the block as block L + 1 (generate's path)
    give the same exit logits; attention makes a position depend on the ones before it; the last layer is the
    model's own. Prompts longer than the tiny Gemmas' sliding window (8), so a wrong window would show."""
    ee = shared(model_type)
    ids, mask = prompts(12)
    hidden = ee.hidden_states(ids, mask)
    for layer in (1, 3):
        assert_close(ee(ids, mask, exit_layer=layer), ee.exit_logits(hidden[layer], layer), rtol=1e-4, atol=1e-5)
    assert_close(ee.exit_logits(hidden[4], 4), ee(ids, mask))
    changed = ids.clone()
    changed[:, -3] = (changed[:, -3] + 1) % 100 + 3
    assert not torch.allclose(ee(changed, mask, exit_layer=2)[:, -1], ee(ids, mask, exit_layer=2)[:, -1])
    plain = EarlyExitHead(tiny_model(model_type))
    assert not torch.allclose(ee(ids, mask, exit_layer=2), plain(ids, mask, exit_layer=2))


def block_kwargs(ee: EarlyExitHead, ids, mask) -> dict[int, dict]:
    """The keyword arguments the model's own full forward hands each block (1-based), by a pre-hook on each."""
    seen = {}
    hooks = [block.register_forward_pre_hook(lambda m, a, kw, k=k: seen.__setitem__(k, (a, kw)), with_kwargs=True)
             for k, block in enumerate(ee.blocks, 1)]
    try:
        ee.decoder(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("model_type", ["gemma3_text"])
def test_on_sliding_and_global_blocks_each_block_and_the_shared_one_get_their_own_type_s_mask_and_rotary(model_type):
    """A naive loop over the blocks with the kwargs the model's full forward hands each one: skipped blocks (layer
    dropout) leave every other block its own type; the shared exit block, a copy of the last (global) block, reads an
    exit with the last block's kwargs, in training and in the truncated model."""
    ee = shared(model_type, layers=(1, 2, 3))
    assert ee.config.layer_types[-1] == "full_attention"
    ids, mask = prompts(12)
    seen = block_kwargs(ee, ids, mask)
    (h,), _ = seen[1]
    naive = {}
    for layer in (1, 3, 4):  # block 2 skipped: block 3 (sliding) must keep its sliding window
        out = ee.blocks[layer - 1](h, **seen[layer][1])
        h = naive[layer] = out[0] if isinstance(out, tuple) else out
    got = ee.hidden_states(ids, mask, skip={2}, raw=True)
    for layer in (1, 3, 4):
        assert_close(got[layer], naive[layer])
    read = ee.hidden_states(ids, mask)
    plain = ee.hidden_states(ids, mask, raw=True)
    for layer in (1, 2, 3):
        expected = ee.adapters.run_block(plain[layer], seen[4][1])  # the last block's mask and rotary table
        assert_close(read[layer], expected)
        assert not torch.allclose(expected, ee.adapters.run_block(plain[layer], seen[1][1]))  # not block 1's
        assert_close(ee(ids, mask, exit_layer=layer), ee.exit_logits(read[layer], layer), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_generate_with_the_shared_block_equals_recomputing_from_scratch(model_type):
    """The model's own generate (a KV cache holding the shared block at layer L + 1) equals greedy decoding that
    recomputes the whole sequence at every step; on Gemma 3 past its sliding window."""
    ee = shared(model_type)
    ids, mask = prompts(7 if model_type == "llama" else 10)
    got = ee.generate(ids, mask, 2, max_new_tokens=6, ignore_eos=True)
    seq, seq_mask = ids, mask
    for step in range(6):
        nxt = ee(seq, seq_mask, exit_layer=2)[:, -1].argmax(-1)
        assert torch.equal(got.tokens[:, step], nxt), step
        seq, seq_mask = torch.cat([seq, nxt[:, None]], 1), torch.cat([seq_mask, torch.ones_like(nxt)[:, None]], 1)


def test_the_shared_block_is_saved_loaded_and_trained(tiny_dir, tmp_path):
    from earlyexit.module import EarlyExitModule, ExitAdapterArgs, ExitLossArgs, OptimArgs

    module = EarlyExitModule(base=ModelArgs(name=tiny_dir, device="cpu"),
                             exit_adapters=ExitAdapterArgs(exit_layers="all", kind="block"),
                             loss=ExitLossArgs(exit_layers="all", distill=1.0, fused=True), optim=OptimArgs(lr=1e-2, warmup_steps=0))
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("exit_adapters.block." in name for name in trainable)
    batch, first, last = train_steps(module, 20)
    ids = batch["input_ids"]
    assert last < 0.8 * first
    module.ee.adapters.save(tmp_path / "adapter")
    loaded, _ = load_model(ModelArgs(name=tiny_dir, device="cpu", adapter=str(tmp_path / "adapter")))
    assert_close(EarlyExitHead(loaded)(ids, exit_layer=2), module.ee(ids, exit_layer=2))


@pytest.mark.parametrize("model_type,fast", [("llama", None), ("mistral", None), ("qwen2", None), ("llama", False),
                                             ("gemma3_text", None)])
def test_the_engine_decodes_the_shared_block_like_generate(model_type, fast):
    """The engine's fixed exits (all in one pass, and one at a time) through the shared block equal the model's own
    generate with the block as block L + 1; padded prompts of three lengths, 12 tokens (past mistral's window). Off
    the fast path (Gemma 3 always) the block runs as its own module, with the last block's mask and rotary table."""
    ee = shared(model_type)
    ids, mask = prompts()
    engine = Engine(ee, fast=fast)
    if fast is False or model_type == "gemma3_text":
        assert engine.fast is None and engine.shared is None and sorted(engine.own_shared) == [1, 2, 3]
    else:
        assert engine.fast is not None and engine.shared is not None
    together = engine.generate(ids, mask, [1, 2, 3, 4], max_new_tokens=12, ignore_eos=True)
    for layer in (1, 2, 3, 4):
        reference = ee.generate(ids, mask, layer, max_new_tokens=12, ignore_eos=True)
        assert torch.equal(together[layer].tokens, reference.tokens), layer
        assert torch.equal(engine.generate(ids, mask, [layer], max_new_tokens=12, ignore_eos=True)[layer].tokens,
                           reference.tokens), layer
    plain = Engine(EarlyExitHead(tiny_model(model_type))).generate(ids, mask, [2], max_new_tokens=12, ignore_eos=True)[2]
    assert not torch.equal(plain.tokens, together[2].tokens)  # the block changes the answers


def naive_speculation(ee, ids, draft_layer, n_draft, new):
    """Greedy self-speculation recomputed from scratch with the model's own forward (the drafts read the exit through
    the shared block as block E + 1): the tokens, and the drafted and accepted counts."""
    out = [int(ee(ids)[0, -1].argmax())]
    drafted = accepted = 0
    while len(out) < new:
        seq = torch.cat([ids, torch.tensor([out])], 1)
        drafts = []
        for _ in range(n_draft):
            drafts.append(int(ee(torch.cat([seq, torch.tensor([drafts], dtype=torch.long)], 1), exit_layer=draft_layer)[0, -1].argmax()))
        full = ee(torch.cat([seq, torch.tensor([drafts])], 1))[0, seq.shape[1] - 1 :].argmax(-1).tolist()  # d + 1 predictions
        kept = 0
        while kept < n_draft and drafts[kept] == full[kept]:
            kept += 1
        out += drafts[:kept] + [full[kept]]
        drafted, accepted = drafted + n_draft, accepted + kept
    return out[:new], drafted, accepted


@pytest.mark.parametrize("draft_layer, n_draft", [(1, 2), (2, 3), (3, 4)])
def test_self_speculation_drafts_through_the_shared_block(draft_layer, n_draft):
    """The engine's drafts read the exit through the shared block (its cache following every kept position): the
    drafted and accepted counts are a from-scratch reference's, and the text is full depth's."""
    ee = shared("llama", seed=4, std=0.05)  # a block that changes the drafts without ruining them
    torch.manual_seed(5)
    ids = torch.randint(3, 100, (1, 6))
    got = Engine(ee).generate_speculative(ids, torch.ones_like(ids), draft_layer, n_draft, max_new_tokens=14, ignore_eos=True)
    tokens, drafted, accepted = naive_speculation(ee, ids, draft_layer, n_draft, 14)
    assert got.tokens[0].tolist() == tokens == ee.generate(ids, torch.ones_like(ids), 4, max_new_tokens=14, ignore_eos=True).tokens[0].tolist()
    assert (got.drafted, got.accepted) == (drafted, accepted)
    assert 0 < accepted < drafted  # kept and rejected drafts: the block's cache carried over both kinds of cycle
    plain = naive_speculation(EarlyExitHead(tiny_model("llama")), ids, draft_layer, n_draft, 14)
    assert plain[1:] != (drafted, accepted)  # the drafts did read the block


@pytest.mark.parametrize("draft_threshold", [0.0, 0.3])
def test_self_speculation_through_the_shared_block_is_exact_on_a_padded_batch(draft_threshold):
    ee = shared("qwen2", seed=4, std=0.05)
    ids, mask = prompts()
    full = ee.generate(ids, mask, 4, max_new_tokens=12, ignore_eos=True)
    got = Engine(ee).generate_speculative(ids, mask, 2, 3, max_new_tokens=12, ignore_eos=True, draft_threshold=draft_threshold)
    assert torch.equal(got.tokens, full.tokens)


@pytest.mark.parametrize("check_every", [1, 2])
def test_dynamic_exits_read_the_shared_block_like_the_reference(check_every):
    """The shared block at every check layer, its cache fed the exit state of tokens that exited below (CALM's
    propagation), and skipped above the exit: the from-scratch reference's tokens and exit layers."""
    from test_engine import dynamic_reference

    ee = shared("llama", seed=4, std=0.05)
    ids = torch.tensor([[5, 17, 42, 9, 33]])
    got = Engine(ee).generate_dynamic(ids, torch.ones_like(ids), threshold=0.0105, min_layer=1, check_every=check_every,
                                      max_new_tokens=12, ignore_eos=True)
    tokens, exits = dynamic_reference(ee, ids, 0.0105, 1, 12, check_every=check_every)
    assert got.tokens[0].tolist() == tokens and got.layers[0].tolist() == exits
    assert len(set(exits)) > 1
    plain = dynamic_reference(EarlyExitHead(tiny_model("llama")), ids, 0.0105, 1, 12, check_every=check_every)
    assert plain != (tokens, exits)  # the exits did read the block


def test_dynamic_exits_at_threshold_zero_are_the_fixed_exit_through_the_shared_block():
    ee = shared("mistral", seed=4, std=0.05)
    ids, mask = prompts()
    engine = Engine(ee)
    fixed = engine.generate(ids, mask, [2], max_new_tokens=12, ignore_eos=True)[2]
    for every in (1, 3):
        got = engine.generate_dynamic(ids, mask, threshold=0.0, min_layer=2, check_every=every, max_new_tokens=12, ignore_eos=True)
        assert torch.equal(got.tokens, fixed.tokens), every
    full = engine.generate_dynamic(ids, mask, threshold=1.01, min_layer=1, max_new_tokens=12, ignore_eos=True)
    assert torch.equal(full.tokens, engine.generate(ids, mask, [4], max_new_tokens=12, ignore_eos=True)[4].tokens)


def test_the_shared_block_is_refused_where_it_cannot_run(tiny_dir):
    from earlyexit.adapters import block_template
    from earlyexit.errors import EarlyExitError

    ids, mask = prompts()
    for model_type, fast in (("llama", False), ("gemma3_text", None)):  # fixed exits run (above); these do not
        engine = Engine(shared(model_type), fast=fast)
        with pytest.raises(EarlyExitError, match="dynamic exits through a shared exit block need the engine's fast path"):
            engine.generate_dynamic(ids, mask, threshold=0.5, max_new_tokens=4)
        with pytest.raises(EarlyExitError, match="self-speculative drafts through a shared exit block need"):
            engine.generate_speculative(ids, mask, 2, 2, max_new_tokens=4)
    with pytest.raises(EarlyExitError, match="has no|have no"):
        block_template(tiny_model("gpt2"))
