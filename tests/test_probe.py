"""The exit probe (CALM's learned confidence): its fit, its labels, and the dynamic exit that reads it."""

import json

import pytest
import torch

from earlyexit import probe as P
from earlyexit.engine import Engine
from earlyexit.errors import EarlyExitError
from earlyexit.generation import GenerationArgs
from earlyexit.model import EarlyExitHead
from test_adapters import prompts, shared
from test_engine import dynamic_reference
from tiny import tiny_model


def random_probe(layers, width: int, seed: int = 0, std: float = 1.0, bias: list[float] | None = None) -> P.ExitProbe:
    """Random weights; ``bias``: per layer (rising biases spread the exits over the layers)."""
    probe = P.ExitProbe(list(layers), width)
    torch.manual_seed(seed)
    torch.nn.init.normal_(probe.weight, std=std)
    if bias is not None:
        probe.bias.data = torch.tensor(bias)
    return probe.requires_grad_(False)


def saved(probe: P.ExitProbe, tmp_path) -> str:
    probe.save(tmp_path / "probe")
    return str(tmp_path / "probe")


def test_the_fit_recovers_a_linear_rule_and_auc_is_the_pairwise_rate():
    torch.manual_seed(0)
    x = torch.randn(3000, 16)
    rule = torch.randn(16)
    y = P.features(x) @ rule + 0.3 > 0
    probe = P.fit({5: (x[:2000], y[:2000])})
    accuracy = ((probe(x[2000:], 5) >= 0.5) == y[2000:]).float().mean()
    assert accuracy > 0.97
    scores = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.3, 0.4])
    labels = torch.tensor([0, 1, 0, 1, 1, 0]).bool()
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in scores[labels] for b in scores[~labels]]
    assert P.auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))


def test_features_ignore_the_scale_of_the_state():
    h = torch.randn(4, 8)
    assert torch.allclose(P.features(h), P.features(7 * h), atol=1e-5)
    assert torch.allclose(P.features(h).pow(2).mean(-1), torch.ones(4), atol=1e-4)


@pytest.mark.parametrize("block", [False, True])
def test_collected_labels_are_each_exits_agreement_with_the_last_layer(block):
    ee = shared("llama", seed=4, std=0.2) if block else EarlyExitHead(tiny_model("llama", seed=3))
    torch.manual_seed(2)
    examples = [{"input_ids": torch.randint(3, 100, (n,)).tolist()} for n in (9, 6)]
    for e, start in zip(examples, (4, 2)):  # the prompt is not supervised
        e["labels"] = [-100] * start + e["input_ids"][start:]
    data = P.collect(ee, examples, [1, 2, 3], batch_size=2, pad_id=0)
    want_x, want_y, want_top = ({layer: [] for layer in (1, 2, 3)} for _ in range(3))
    for e, start in zip(examples, (4, 2)):
        ids = torch.tensor([e["input_ids"]])
        raw = ee.hidden_states(ids, raw=True)
        final = ee(ids)[0].argmax(-1)
        for layer in (1, 2, 3):
            logits = ee(ids, exit_layer=layer)[0]
            positions = range(start - 1, len(e["input_ids"]) - 1)  # those predicting a supervised token
            want_x[layer] += [P.features(raw[layer][0, t]) for t in positions]
            want_y[layer] += [bool(logits[t].argmax() == final[t]) for t in positions]
            want_top[layer] += [float(logits[t].softmax(-1).max()) for t in positions]
    for layer in (1, 2, 3):
        x, y, top = data[layer]
        assert torch.allclose(x, torch.stack(want_x[layer]), atol=1e-5)
        assert y.tolist() == want_y[layer]
        assert torch.allclose(top, torch.tensor(want_top[layer]), atol=1e-5)
    assert any(not all(want_y[layer]) for layer in (1, 2)) and any(any(want_y[layer]) for layer in (1, 2))


def test_save_load_and_what_is_refused(tmp_path):
    probe = random_probe([2, 3], 8)
    loaded = P.ExitProbe.load(saved(probe, tmp_path), 8)
    assert loaded.layers == [2, 3] and torch.equal(loaded.weight, probe.weight) and torch.equal(loaded.bias, probe.bias)
    with pytest.raises(EarlyExitError, match="reads states of size 8; this model's are 16"):
        P.ExitProbe.load(tmp_path / "probe", 16)
    with pytest.raises(EarlyExitError, match="no exit probe in"):
        P.ExitProbe.load(tmp_path / "elsewhere")
    with pytest.raises(EarlyExitError, match=r"fitted at layers \[2, 3\], not at check layers \[1\]"):
        loaded.require([1, 2], "here")
    with pytest.raises(EarlyExitError, match="generation.measure learned reads an exit probe"):
        GenerationArgs(measure="learned")
    with pytest.raises(EarlyExitError, match="no exit probe there"):
        GenerationArgs(measure="learned", probe=str(tmp_path / "elsewhere"))


# --- the dynamic exit that reads it --------------------------------------------------------------------


@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("defer", [16, 2])
def test_the_learned_measure_exits_like_the_reference(block, defer, tmp_path, monkeypatch):
    """Batch 1, every layer a check: the tokens and exit layers of the from-scratch reference with the same probe (the
    shared block, when there is one, run only where a token exits on the skipping path; skipped positions' K/V, its
    own at the checks above included, waiting at most 16 or 2 steps)."""
    import earlyexit.engine.core as core
    import earlyexit.engine.dynamic as dynamic

    monkeypatch.setattr(core, "DEFER", defer)
    monkeypatch.setattr(dynamic, "DEFER", defer)
    ee = shared("llama", seed=4, std=0.2) if block else EarlyExitHead(tiny_model("llama", seed=3))
    probe = random_probe([1, 2, 3], ee.config.hidden_size, seed=1, std=0.3)
    ids = torch.tensor([[5, 17, 42, 9, 33]])
    tokens, exits = dynamic_reference(ee, ids, 0.5, 1, 16, "learned", probe=probe)
    assert len(set(exits)) > 1
    for fast in (True,) if block else (True, False):  # the shared block decodes on the fast path only
        got = Engine(ee, fast=fast).generate_dynamic(ids, torch.ones_like(ids), threshold=0.5, min_layer=1, measure="learned",
                                                     probe=saved(probe, tmp_path), max_new_tokens=16, ignore_eos=True)
        assert got.tokens[0].tolist() == tokens and got.layers[0].tolist() == exits, fast


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_learned_measure_skips_like_it_propagates_on_a_padded_batch(family, tmp_path):
    """Rows exit at different check layers, EOS ends some: the skipping path's answers are the propagating path's."""
    ee = EarlyExitHead(tiny_model(family, seed=5))
    ids, mask = prompts()
    probe = saved(random_probe([1, 2, 3], ee.config.hidden_size, seed=2, std=0.1, bias=[-0.3, 0.0, 0.5]), tmp_path)
    eos = [int(t) for t in ee.generate(ids, mask, 4, max_new_tokens=4, ignore_eos=True).tokens[:, 2]]
    fast, generic = Engine(ee, fast=True), Engine(ee, fast=False)
    for threshold, checks in ((0.5, [1, 2, 3]), (0.5, [2]), (0.0, [1, 3]), (1.01, [1, 2, 3])):
        a = fast.generate_dynamic(ids, mask, threshold=threshold, check_layers=checks, measure="learned", probe=probe,
                                  max_new_tokens=12, eos_token_id=eos)
        b = generic.generate_dynamic(ids, mask, threshold=threshold, check_layers=checks, measure="learned", probe=probe,
                                     max_new_tokens=12, eos_token_id=eos)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.layers, b.layers), (threshold, checks)
        if threshold == 0.5 and len(checks) == 3:
            assert len(set(a.layers[a.layers > 0].tolist())) > 2  # tokens exit at several layers
        if threshold == 0.0:
            assert (a.layers[a.layers > 0] == 1).all()
        if threshold == 1.01:
            assert torch.equal(a.tokens, fast.generate(ids, mask, [4], max_new_tokens=12, eos_token_id=eos)[4].tokens)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_the_learned_measure_through_the_shared_block_on_a_padded_batch(family, tmp_path):
    """Rows of a padded batch exit at different layers in one step (the shared block then runs for some rows and
    not yet for others): each row's tokens and exit layers are the from-scratch reference's for that prompt alone."""
    ee = shared(family, seed=4, std=0.05)
    ids, mask = prompts()
    probe = random_probe([1, 2, 3], ee.config.hidden_size, seed=2, std=0.3)
    got = Engine(ee).generate_dynamic(ids, mask, threshold=0.5, min_layer=1, measure="learned", probe=saved(probe, tmp_path),
                                      max_new_tokens=10, ignore_eos=True)
    steps_with_mixed_exits = 0
    for row in range(ids.shape[0]):
        tokens, exits = dynamic_reference(ee, ids[row : row + 1, mask[row].bool()], 0.5, 1, 10, "learned", probe=probe)
        assert got.tokens[row].tolist() == tokens and got.layers[row].tolist() == exits, row
    for step in range(10):
        steps_with_mixed_exits += len(set(got.layers[:, step].tolist())) > 1
    assert steps_with_mixed_exits > 2


def test_the_shared_block_runs_only_where_a_token_exits(tmp_path):
    """Batch 1, checks at 1, 2, 3: the probe says exit at 2 every time; the shared block runs once a step (at 2), and
    check 1 only writes its keys and values."""
    ee = shared("llama", seed=4, std=0.05)
    width = ee.config.hidden_size
    probe = P.ExitProbe([1, 2, 3], width)
    probe.bias.data = torch.tensor([-50.0, 50.0, 50.0])
    engine = Engine(ee, fast=True)
    runs, n = [], ee.n_layers
    block_call = type(engine.shared).__call__  # the model's own blocks share the class: only cache layers past n count
    type(engine.shared).__call__ = lambda self, *a: (self.layer_idx >= n and runs.append(self.layer_idx)) or block_call(self, *a)
    try:
        ids = torch.tensor([[5, 17, 42, 9, 33]])
        out = engine.generate_dynamic(ids, torch.ones_like(ids), threshold=0.9, check_layers=[1, 2, 3], measure="learned",
                                      probe=saved(probe, tmp_path), max_new_tokens=6, ignore_eos=True)
    finally:
        type(engine.shared).__call__ = block_call
    assert (out.layers == 2).all()
    assert runs[:3] == [n + 1, n + 2, n + 3]  # the prompt: every check layer's cache, every position
    assert runs[3:] == [n + 2] * 5  # then one block a token, at its exit
    assert torch.equal(out.tokens, Engine(ee).generate(ids, torch.ones_like(ids), [2], max_new_tokens=6, ignore_eos=True)[2].tokens)


def test_the_probe_must_cover_the_check_layers(tmp_path):
    ee = EarlyExitHead(tiny_model("llama"))
    probe = saved(random_probe([2], ee.config.hidden_size), tmp_path)
    ids, mask = prompts()
    with pytest.raises(EarlyExitError, match=r"not at check layers \[1, 3\]"):
        Engine(ee).generate_dynamic(ids, mask, check_layers=[1, 2, 3], measure="learned", probe=probe, max_new_tokens=2)


def test_fit_probe_script_writes_a_probe_the_sweep_reads(tiny_dir, tmp_path, monkeypatch, capsys):
    from commands import run_command

    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"It is {i} or {i + 1}."} for i in range(12)]))
    argv = ["--model.name", tiny_dir, "--model.device", "cpu", "--source", str(data), "--eval_size", "2", "--val_size", "0",
            "--layers", "1,2", "--examples", "10", "--held_out", "0.3", "--out", str(tmp_path / "probe")]
    assert run_command("fit_probe.py", argv, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "7 examples fitted, 3 held out" in out
    assert {"1", "2"} == {line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "layer" not in line}
    about = json.loads((tmp_path / "probe" / P.CONFIG).read_text())
    assert about["layers"] == [1, 2] and set(about["about"]["held_out"]) == {"1", "2"}
    argv = ["--model.name", tiny_dir, "--model.device", "cpu", "--data", str(data), "--records", "2", "--batch", "2",
            "--fixed", "[4]", "--measures", "{softmax: [0.5], learned: [0.0, 0.5]}", "--generation.max_new_tokens", "4",
            "--generation.check_layers", "[1,2]", "--generation.probe", str(tmp_path / "probe"), "--target", "0.5",
            "--speed_plot", str(tmp_path / "qs.png"), "--calibrate", "0"]
    assert run_command("sweep_dynamic.py", argv, monkeypatch) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:3] for line in out.splitlines() if line.startswith("| dynamic")]
    assert [(k.strip(), v.strip()) for k, v in rows] == [("dynamic softmax", "0.5"), ("dynamic learned", "0.0"), ("dynamic learned", "0.5")]
    assert "calibrated threshold (learned): 0.0" in out and (tmp_path / "qs.png").is_file()  # threshold 0: exits at 1, fewest layers
    argv[argv.index("--generation.probe") + 1] = str(tmp_path / "nowhere")
    assert run_command("sweep_dynamic.py", argv, monkeypatch) == 2
    assert "generation.probe" in capsys.readouterr().err
    argv = ["--model.name", tiny_dir, "--model.device", "cpu", "--source", str(data), "--layers", "4", "--out", str(tmp_path / "x")]
    assert run_command("fit_probe.py", argv, monkeypatch) == 2
    assert "a probe serves check layers below the last (4)" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graphs_decode_the_learned_measure_like_the_eager_engine(tmp_path):
    """On a GPU, float32, through the shared block: the graphed pieces, fills and deferred blocks give the eager
    engine's tokens and exit layers, on the first call and on replays."""
    ee = shared("llama", seed=4, std=0.05)
    ee.lm.cuda()
    ids, mask = prompts()
    probe = saved(random_probe([1, 2, 3], ee.config.hidden_size, seed=2, std=0.1, bias=[-0.3, 0.0, 0.5]), tmp_path)
    eager, graphed = Engine(ee, cuda_graphs=False), Engine(ee, cuda_graphs=True)
    for _ in range(2):
        for threshold in (0.0, 0.5, 1.01):
            a, b = (e.generate_dynamic(ids, mask, threshold=threshold, min_layer=1, measure="learned", probe=probe,
                                       max_new_tokens=12, ignore_eos=True, schedule="all") for e in (eager, graphed))
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.layers, b.layers), threshold
