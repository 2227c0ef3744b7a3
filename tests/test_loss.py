"""The early-exit loss against a naive per-layer loop; weights, curricula and layer dropout tables."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from earlyexit.adapters import ExitAdapters, attach
from earlyexit.loss import (SparseTeacher, active_exits, dropped_layers, early_exit_loss, exit_weights,
                            layer_dropout_rates, pulled_teacher)
from earlyexit.model import EarlyExitHead
from tiny import tiny_model


def naive(hidden, labels, head, weights, teacher=None, alpha=0.0):
    """Reference: full [B, T, V] logits per layer, F.cross_entropy, explicit KL, weighted mean."""
    total = 0.0
    norm = sum(weights.values())
    keep = labels[:, 1:] != -100
    for layer, w in weights.items():
        logits = head(hidden[layer])[:, :-1].float()  # [B, T-1, V]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss = ce
        if teacher is not None:
            logp = F.log_softmax(logits[keep], -1)
            kl = F.kl_div(logp, teacher, log_target=True, reduction="batchmean")
            loss = (1 - alpha) * ce + alpha * kl
        total = total + w / norm * loss
    return total


@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_chunked_loss_equals_naive_loop_and_gradients(tiny, chunk, alpha):
    ee = EarlyExitHead(tiny)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 6:] = -100
    weights = exit_weights([1, 3, 4], 4, "sum_l", e_scale=0.5)
    teacher = None
    if alpha:
        m = int((labels[:, 1:] != -100).sum())
        teacher = F.log_softmax(torch.randn(m, 128, generator=g), -1)

    def run(fn):
        tiny.zero_grad()
        hidden = ee.hidden_states(ids, exit_layers=[1, 3, 4])
        loss = fn(hidden)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in tiny.parameters() if p.grad is not None]

    ours, ours_grad = run(lambda h: early_exit_loss(h, labels, ee.exit_logits, weights, teacher, alpha, chunk).total)
    ref, ref_grad = run(lambda h: naive(h, labels, ee.exit_logits, weights, teacher, alpha))
    assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_grad, ref_grad):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi"])
@pytest.mark.parametrize("teacher_kind", [None, "dense", "top-k", "top-V"])
@pytest.mark.parametrize("chunk", [4, 1024])
def test_fused_loss_equals_the_reference_and_its_gradients(family, teacher_kind, chunk):
    """The fused loss (gradient computed in the forward pass) against the checkpointed reference: the total, each
    exit's CE and the gradients of every trained weight (exit adapters, the trunk) and of the block outputs; Gemma-2
    soft-caps its logits, Phi's head has a bias."""
    torch.manual_seed(0)
    model = tiny_model(family)
    adapters = ExitAdapters([1, 3], model.config.hidden_size)
    for p in adapters.parameters():
        torch.nn.init.normal_(p, std=0.1)
    attach(model, adapters)
    ee = EarlyExitHead(model)
    for p in ee.head.parameters():
        p.requires_grad_(False)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 7:] = -100
    weights = exit_weights([1, 3, 4], 4, "sum_l")
    m = int((labels[:, 1:] != -100).sum())
    dense = F.log_softmax(torch.randn(m, vocab, generator=g) * 2, -1)
    teacher = {None: None, "dense": dense}.get(teacher_kind)
    if teacher_kind in ("top-k", "top-V"):
        top = dense.topk(5 if teacher_kind == "top-k" else vocab, -1)
        teacher = SparseTeacher(top.indices.int(), top.values)
    alpha = 0.0 if teacher is None else 0.6
    linear = ee.linear_head()
    assert linear is not None and (linear.softcap is not None) == (family == "gemma2")

    def run(fused):
        model.zero_grad(set_to_none=True)
        hidden = ee.hidden_states(ids, exit_layers=[1, 3, 4])
        for h in hidden.values():
            h.retain_grad()
        out = early_exit_loss(hidden, labels, ee.exit_logits, weights, teacher, alpha, chunk, fused=linear if fused else None)
        out.total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads, {layer: h.grad.clone() for layer, h in hidden.items()}

    ref, ref_grads, ref_h = run(False)
    got, got_grads, got_h = run(True)
    assert_close(got.total, ref.total, rtol=1e-5, atol=1e-6)
    for layer in ref.per_exit:
        assert_close(got.per_exit[layer], ref.per_exit[layer], rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == ref_grads.keys() and any("maps" in n for n in ref_grads)
    for name in ref_grads:
        assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for layer in ref_h:
        assert_close(got_h[layer], ref_h[layer], rtol=1e-4, atol=1e-7)


def test_fused_loss_is_refused_for_a_trained_head(tmp_path):
    from earlyexit.errors import EarlyExitError
    from earlyexit.loading import ModelArgs
    from earlyexit.module import EarlyExitModule, ExitLossArgs, LoraArgs
    from tests.tiny import save_tiny

    with pytest.raises(EarlyExitError, match="loss.fused needs the output head frozen"):  # at once, before training
        EarlyExitModule(base=ModelArgs(name=save_tiny(tmp_path / "llama", "llama"), device="cpu", dtype="float32"),
                        lora=LoraArgs(r=2, target_modules=["q_proj", "lm_head"]), loss=ExitLossArgs(fused=True))


def test_the_pulled_teacher_is_the_normalised_geometric_mean():
    g = torch.Generator().manual_seed(0)
    teacher, exit_ = (F.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1) for _ in range(2))
    for beta in (0.25, 0.5):
        mix = teacher.exp() ** (1 - beta) * exit_.exp() ** beta
        assert_close(pulled_teacher(teacher, exit_, beta).exp(), (mix / mix.sum(-1, keepdim=True)).float())
    assert pulled_teacher(teacher, exit_, 0.0) is teacher
    assert_close(pulled_teacher(teacher, exit_, 1.0), exit_.float())


def test_per_exit_cross_entropy_is_reported():
    ee = EarlyExitHead(tiny_model("llama"))
    ids = torch.randint(3, 128, (2, 6))
    out = early_exit_loss(ee.hidden_states(ids), ids, ee.exit_logits, exit_weights([2, 4], 4, "uniform"))
    assert set(out.per_exit) == {2, 4}
    full = F.cross_entropy(ee(ids)[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert_close(out.per_exit[4], full)


def test_weight_schemes():
    assert exit_weights([1, 2, 4], 4, "uniform") == pytest.approx({1: 1 / 3, 2: 1 / 3, 4: 1 / 3})
    assert exit_weights([1, 2, 4], 4, "linear") == pytest.approx({1: 1 / 7, 2: 2 / 7, 4: 4 / 7})
    assert exit_weights([1, 2, 4], 4, "sum_l") == pytest.approx({1: 1 / 14, 2: 3 / 14, 4: 10 / 14})
    assert exit_weights([2, 4], 4, "uniform", e_scale=0.5) == pytest.approx({2: 1 / 3, 4: 2 / 3})


def test_curricula():
    exits = [2, 4, 6, 8]
    assert active_exits(7, exits, 8, "none") == [2, 4, 6, 8]
    assert [active_exits(s, exits, 8, "rotational", rotation=2) for s in range(3)] == [[2, 6, 8], [4, 8], [2, 6, 8]]
    assert [active_exits(s, exits, 8, "rotational", rotation=3) for s in range(3)] == [[2, 8], [4, 8], [6, 8]]
    assert [active_exits(s, exits, 8, "gradual", gradual_interval=10) for s in (0, 9, 10, 25, 30, 99)] == [
        [8], [8], [6, 8], [4, 6, 8], [2, 4, 6, 8], [2, 4, 6, 8]]


def test_layer_dropout_rates_and_frequencies():
    rates = layer_dropout_rates(5, 0.4, "linear")
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    exp = layer_dropout_rates(5, 0.4, "exp")
    assert exp[0] == 0 and exp[-1] == pytest.approx(0.4) and all(a < b for a, b in zip(exp, exp[1:]))
    assert layer_dropout_rates(3, 0.2, "uniform") == pytest.approx([0.2] * 3)
    counts = torch.zeros(5)
    steps = 4000
    for step in range(steps):
        for layer in dropped_layers(step, rates, seed=1):
            counts[layer - 1] += 1
    assert counts[0] == 0
    assert_close(counts / steps, torch.tensor(rates), atol=0.03, rtol=0)
    assert dropped_layers(17, rates, seed=1) == dropped_layers(17, rates, seed=1)  # a pure function of the step
    assert dropped_layers(3, [0.0] * 5) == set()


def test_skipped_blocks_are_not_run_and_pass_their_input_through(tiny):
    ee = EarlyExitHead(tiny)
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(ee.blocks, 1)]
    ids = torch.randint(3, 128, (2, 5))
    hidden = ee.hidden_states(ids, skip={2, 3})
    for h in hooks:
        h.remove()
    assert ran == [1, 4]
    assert torch.equal(hidden[2], hidden[1]) and torch.equal(hidden[3], hidden[1])


def test_top1_agreement_equals_a_naive_count_and_implies_the_accepted_drafts():
    from earlyexit.loss import accepted_per_cycle, top1_agreement

    ee = EarlyExitHead(tiny_model("llama"))
    ids = torch.randint(3, 100, (3, 9))
    labels = ids.clone()
    labels[0, :5] = -100
    hidden = ee.hidden_states(ids)
    got = top1_agreement(hidden, labels, ee.exit_logits, 4, chunk_size=4)
    keep = labels[:, 1:] != -100
    final = ee.exit_logits(hidden[4])[:, :-1][keep].argmax(-1)
    for layer in (1, 2, 3):
        naive = (ee.exit_logits(hidden[layer])[:, :-1][keep].argmax(-1) == final).float().mean()
        assert float(got[layer]) == pytest.approx(float(naive))
    assert set(got) == {1, 2, 3}
    assert accepted_per_cycle(1.0, 4) == 5 and accepted_per_cycle(0.0, 4) == 1 and accepted_per_cycle(0.5, 2) == 1.75


def test_speculative_speedup_and_the_best_number_of_drafts():
    from earlyexit.loss import best_n_draft, speculative_speedup

    assert speculative_speedup(1.0, 15, 30, 4) == pytest.approx(5 / 3)  # every draft kept: 5 tokens for 1 + 4·0.5 steps
    assert speculative_speedup(0.0, 15, 30, 4) == pytest.approx(1 / 3)
    assert speculative_speedup(0.5, 10, 30, 2) == pytest.approx(1.75 / (1 + 2 / 3))
    d, best = best_n_draft(0.9, 6, 30)
    assert best == max(speculative_speedup(0.9, 6, 30, k) for k in range(1, 9)) and 1 <= d <= 8 and best > 1
    assert best_n_draft(0.1, 15, 30) == (1, pytest.approx(1.1 / 1.5))  # poor drafts: draft as little as possible


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """Regional compilation (each block's forward through torch.compile) changes nothing but speed; every block
    reuses one compiled graph, and the plain forwards come back."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ee = EarlyExitHead(model)
    ids = torch.randint(3, 128, (2, 8))
    weights = exit_weights([2, 4], 4, "uniform")

    def run():
        model.zero_grad(set_to_none=True)
        out = early_exit_loss(ee.hidden_states(ids, exit_layers=[2, 4]), ids, ee.exit_logits, weights)
        out.total.backward()
        return out.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = run()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ee.compile_blocks()
    assert all("forward" in block.__dict__ for block in ee.blocks)
    got, got_grads = run()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    ee.compile_blocks(False)
    assert not any("forward" in block.__dict__ for block in ee.blocks)
    assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert frames <= 2, frames  # one graph for all four blocks (not one per block)


def test_compiled_blocks_leave_forwards_without_gradients_eager():
    """The teacher pass, validation and measurements record no gradients: with compiled blocks they run the plain
    forwards (no graph is compiled for them, which cost a GPU run seconds per graph) and give the same states; the
    training forward after them still compiles."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ee = EarlyExitHead(model)
    ids = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        ref = ee.hidden_states(ids, exit_layers=[2, 4])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ee.compile_blocks()
    try:
        with torch.no_grad():
            got = ee.hidden_states(ids, exit_layers=[2, 4])
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
        for layer in ref:
            assert_close(got[layer], ref[layer])
        ee.hidden_states(ids, exit_layers=[2, 4])[4].sum().backward()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    finally:
        ee.compile_blocks(False)


@pytest.mark.parametrize("teacher_kind, softcap", [("dense", 30.0), ("top-k", None)])
def test_the_compiled_chunk_terms_equal_the_eager_ones(teacher_kind, softcap):
    """What the fused loss runs on a GPU (chunk_terms through torch.compile, dynamic shapes) against the eager
    function, here compiled for the CPU, on two chunk lengths."""
    from earlyexit.loss import _compiled_chunk_terms, chunk_terms

    g = torch.Generator().manual_seed(0)
    for rows in (7, 5):
        z = torch.randn(rows, 50, generator=g) * 3
        target = torch.randint(0, 50, (rows,), generator=g)
        dense = F.log_softmax(torch.randn(rows, 50, generator=g), -1)
        if teacher_kind == "dense":
            t_logp, t_ids = dense, None
        else:
            top = dense.topk(6, -1)
            t_logp, t_ids = top.values, top.indices.int()
        want = chunk_terms(z, target, t_logp, t_ids, 0.6, softcap)
        got = _compiled_chunk_terms()(z, target, t_logp, t_ids, 0.6, softcap)
        for a, b in zip(got, want):
            assert_close(a, b, rtol=1e-5, atol=1e-6)
