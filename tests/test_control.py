"""A decode step's control flow (earlyexit/engine/control.py): plans walked by the host, and on a GPU the
device-decided engine (one CUDA graph a step, branches as conditional nodes) against the host-decided one."""

import pytest
import torch

from earlyexit.engine import Engine
from earlyexit.engine.control import Branch, device_decisions, pieces, resolve, walk
from earlyexit.errors import EarlyExitError
from earlyexit.generation import GenerationArgs
from earlyexit.model import EarlyExitHead
from test_adapters import shared
from test_engine import prompts
from test_probe import random_probe, saved
from tiny import tiny_model


def test_a_plan_lists_each_piece_once_and_the_host_walks_the_branch_its_flag_picks():
    ran = []
    a, b, c, d = (lambda name=name: ran.append(name) for name in "abcd")
    yes, no = torch.tensor(True), torch.tensor(False)
    plan = [a, Branch(no, b, [c, Branch(yes, d)])]
    assert pieces(plan) == [a, b, c, d]
    walk(plan)
    assert ran == ["a", "c", "d"]
    ran.clear()
    walk(Branch(yes, b, c), run=lambda piece: (ran.append("replay"), piece()))
    assert ran == ["replay", "b"]


def test_device_decisions_need_a_gpu_and_are_refused_in_one_line_where_they_cannot_be_built():
    if device_decisions() is not None:
        pytest.skip("conditional nodes can be built here")
    assert resolve("auto") == ("host", None) and resolve("host") == ("host", None)
    with pytest.raises(EarlyExitError, match="generation.decide device needs CUDA graph conditional nodes"):
        resolve("device")
    with pytest.raises(EarlyExitError, match="generation.decide 'gpu': choose auto, device or host"):
        GenerationArgs(decide="gpu")


def test_the_host_decides_the_same_on_the_cpu_whatever_decide_says():
    ee = EarlyExitHead(tiny_model("llama", seed=2))
    ids, mask = prompts()
    engine = Engine(ee)
    a, b = (engine.generate_dynamic(ids, mask, threshold=0.0105, min_layer=2, max_new_tokens=10, ignore_eos=True, decide=decide)
            for decide in ("host", "auto"))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.layers, b.layers) and a.full_from is None


# --- on a GPU -------------------------------------------------------------------------------------------

NODES = [nodes for nodes in ("torch", "driver") if device_decisions(nodes) == nodes]
gpu = pytest.mark.skipif(not NODES, reason="needs a GPU where CUDA graph conditional nodes can be built")


def eos_prompts(ee):
    """The padded prompts and an EOS id that one row emits early at full depth (rows then stop at different steps)."""
    ids, mask = prompts()
    free = ee.generate(ids.cuda(), mask.cuda(), ee.n_layers, max_new_tokens=40, ignore_eos=True)
    return ids.cuda(), mask.cuda(), int(free.tokens[0, 20])


@gpu
@pytest.mark.parametrize("nodes", NODES)
@pytest.mark.parametrize("compile", [False, True])
def test_device_decisions_equal_host_decisions_in_every_mode(nodes, compile, tmp_path):
    """float32, a padded batch whose rows stop at EOS at different steps, 40 tokens (past the host's looks every 16):
    dynamic exits (softmax, margin, state; learned and softmax through a shared exit block) and self-speculation
    (always d drafts, adaptive drafting) give the same tokens, exit layers and acceptance either way, and the eager
    engine's."""
    plain = EarlyExitHead(tiny_model("llama", seed=2).cuda())
    block = shared("llama", seed=4, std=0.05)
    block.lm.cuda()
    probe = saved(random_probe([1, 2, 3], block.config.hidden_size, seed=2, std=0.1, bias=[-0.3, 0.0, 0.5]), tmp_path)
    for ee in (plain, block):
        ids, mask, eos = eos_prompts(ee)
        common = dict(max_new_tokens=40, eos_token_id=eos, pad_token_id=0, fallback=False, schedule="all")
        engines = {decide: Engine(ee, compile=compile, nodes=nodes) for decide in ("host", "device")}
        eager = Engine(ee, cuda_graphs=False)
        settings = [dict(measure=m, threshold=t) for m in ("softmax", "margin", "state") for t in (0.0, 0.0105, 0.6, 1.01)]
        if ee is block:
            settings += [dict(measure="learned", probe=probe, threshold=t) for t in (0.0, 0.5, 1.01)]
        if compile:  # each setting compiles its pieces again (minutes on a GPU): one that exits at every check layer
            settings = [settings[-2] if ee is block else dict(measure="softmax", threshold=0.0105)]
        for setting in settings:
            for _ in range(2):  # the first call captures, the second replays
                got = {d: e.generate_dynamic(ids, mask, min_layer=1, decide=d, **setting, **common) for d, e in engines.items()}
                ref = eager.generate_dynamic(ids, mask, min_layer=1, **setting, **common)
                for out in got.values():
                    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.layers, ref.layers), setting
                    assert out.full_from is None
        for draft_threshold in (0.3,) if compile else (0.0, 0.3, 0.9):
            got = {d: e.generate_speculative(ids, mask, 2, 3, draft_threshold=draft_threshold, decide=d, **common)
                   for d, e in engines.items()}
            ref = eager.generate_speculative(ids, mask, 2, 3, draft_threshold=draft_threshold, **common)
            full = eager.generate(ids, mask, [4], max_new_tokens=40, eos_token_id=eos, pad_token_id=0)[4]
            assert torch.equal(ref.tokens, full.tokens)
            for out in got.values():
                assert torch.equal(out.tokens, ref.tokens), draft_threshold
                assert (out.drafted, out.accepted) == (ref.drafted, ref.accepted), draft_threshold


@gpu
def test_adaptive_modes_slower_than_full_depth_fall_back_to_it_and_say_from_when():
    """A dynamic exit that never exits (every check is pure cost) and speculation from a random exit (nearly nothing
    accepted) are slower than full depth: after the first look they decode at full depth, and the text stays the
    full-depth text (a never-exiting dynamic exit's tokens are the last layer's anyway)."""
    ee = EarlyExitHead(tiny_model("llama", seed=2).cuda())
    ids, mask = prompts()
    ids, mask = ids.cuda(), mask.cuda()
    engine = Engine(ee)
    full = engine.generate(ids, mask, [4], max_new_tokens=64, ignore_eos=True)[4]
    common = dict(max_new_tokens=64, ignore_eos=True, schedule="all")  # the fallback, not the schedule, must catch it
    dynamic = engine.generate_dynamic(ids, mask, threshold=1.01, min_layer=1, **common)
    assert dynamic.full_from == 17 and torch.equal(dynamic.tokens, full.tokens)
    assert (dynamic.layers == 4).all()
    spec = engine.generate_speculative(ids, mask, 1, 4, **common)
    assert spec.full_from is not None and torch.equal(spec.tokens, full.tokens)
    kept = engine.generate_dynamic(ids, mask, threshold=1.01, min_layer=1, fallback=False, **common)
    assert kept.full_from is None
    scheduled = engine.generate_dynamic(ids, mask, threshold=1.01, min_layer=1, max_new_tokens=64, ignore_eos=True)
    assert set(scheduled.checks) <= {1, 2, 3} and torch.equal(scheduled.tokens, full.tokens)  # timed, then decoded
