"""The lens against references: separate truncated forwards, the model's own softmax, naive cross-entropy."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from earlyexit.data import AlpacaDataModule
from earlyexit.lens import TunedLens, dataset_lens, main, token_lens, train_tuned_lens
from earlyexit.model import EarlyExitHead
from commands import refusal, refusal_process
from tiny import char_tokenizer, records_file, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT, ANSWER = [2, 40, 41, 42, 43, 44], [50, 51, 52, 53, 54, 55, 56]


def test_one_pass_equals_a_separate_truncated_forward_at_every_layer(tiny):
    ee = EarlyExitHead(tiny)
    result = token_lens(ee, char_tokenizer(), PROMPT, ANSWER)
    ids = torch.tensor([PROMPT + ANSWER])
    for layer in range(1, ee.n_layers + 1):
        logp = F.log_softmax(ee(ids, exit_layer=layer)[0, len(PROMPT) - 1 : -1].float(), -1)
        expected = logp.gather(-1, torch.tensor(ANSWER)[:, None])[:, 0].exp()
        assert_close(torch.tensor(result.prob[layer - 1]), expected, rtol=1e-5, atol=1e-6)
        assert result.top1[layer - 1] == logp.argmax(-1).tolist()
        entropy = -(logp.exp() * logp).sum(-1)
        assert_close(torch.tensor(result.entropy[layer - 1]), entropy, rtol=1e-5, atol=1e-5)


def test_last_layer_is_the_models_own_softmax_never_normalised_twice(tiny):
    """Block N's raw output goes through the final norm once; a second norm would change these numbers."""
    ee = EarlyExitHead(tiny)
    result = token_lens(ee, char_tokenizer(), PROMPT, ANSWER)
    own = F.softmax(tiny(input_ids=torch.tensor([PROMPT + ANSWER])).logits[0, len(PROMPT) - 1 : -1], -1)
    assert_close(torch.tensor(result.prob[-1]), own.gather(-1, torch.tensor(ANSWER)[:, None])[:, 0])
    assert result.kl[-1] == pytest.approx([0.0] * len(ANSWER), abs=1e-6)
    assert result.summary()["top1_agreement"][-1] == 1.0


def test_kl_matches_torch(tiny):
    ee = EarlyExitHead(tiny)
    result = token_lens(ee, char_tokenizer(), PROMPT, ANSWER)
    ids = torch.tensor([PROMPT + ANSWER])
    final = F.log_softmax(ee(ids)[0, len(PROMPT) - 1 : -1], -1)
    layer1 = F.log_softmax(ee(ids, exit_layer=1)[0, len(PROMPT) - 1 : -1], -1)
    kl = F.kl_div(layer1, final, log_target=True, reduction="none").sum(-1)
    assert_close(torch.tensor(result.kl[0]), kl, rtol=1e-4, atol=1e-5)


def batches(model_type="llama"):
    tok = char_tokenizer()
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"It is {i}, yes."} for i in range(12)]
    from earlyexit.data import encode_examples

    dm = AlpacaDataModule(template="alpaca")
    dm.attach_tokenizer(tok)
    examples = encode_examples(records, tok, "alpaca", 256)
    return [dm.collate_train(examples[i : i + 4]) for i in range(0, 12, 4)]


def test_dataset_cross_entropy_equals_the_models_loss_at_the_last_layer():
    model = tiny_model("llama")
    ee = EarlyExitHead(model)
    data = batches()
    stats = dataset_lens(ee, data)
    total, count = 0.0, 0
    for b in data:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").item()
        count += int((labels != -100).sum())
    assert stats["tokens"] == count
    assert stats["cross_entropy"][-1] == pytest.approx(total / count, rel=1e-5)
    assert stats["kl_to_final"][-1] == pytest.approx(0.0, abs=1e-6) and stats["top1_agreement"][-1] == 1.0
    assert len(stats["cross_entropy"]) == 4


def test_tuned_lens_starts_as_the_logit_lens_and_learns(tiny):
    ee = EarlyExitHead(tiny)
    tuned = TunedLens(ee.n_layers, ee.config.hidden_size)
    plain = token_lens(ee, char_tokenizer(), PROMPT, ANSWER)
    at_init = token_lens(ee, char_tokenizer(), PROMPT, ANSWER, tuned)
    assert at_init.prob == plain.prob and at_init.kl == plain.kl
    lens, history = train_tuned_lens(ee, batches(), steps=30, lr=1e-2)
    assert history[-1] < 0.8 * history[0]
    assert all(p.grad is None for p in ee.parameters())  # the model itself is never trained
    after = dataset_lens(ee, batches(), lens)["kl_to_final"]
    before = dataset_lens(ee, batches())["kl_to_final"]
    assert sum(after[:-1]) < sum(before[:-1])


def test_tuned_lens_save_and_load(tmp_path):
    lens = TunedLens(4, 32)
    torch.nn.init.normal_(lens.translators[1].weight)
    lens.save(tmp_path / "lens.pt")
    loaded = TunedLens.load(tmp_path / "lens.pt")
    h = torch.randn(2, 3, 32)
    assert_close(loaded(h, 2), lens(h, 2))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return records_file(tmp_path_factory, [{"instruction": f"Say {i}.", "input": "", "output": f"It is {i}."} for i in range(30)])


def test_figures_and_numbers_without_a_display(tiny_dir, data_file, tmp_path):
    main(["--model.name", tiny_dir, "--model.device", "cpu", "--prompt", "Calculate the atomic mass for lithium.",
          "--data.source", data_file, "--data.eval_size", "10", "--data.val_size", "2", "--index", "[3]",
          "--limit", "6", "--tuned.train_steps", "3", "--max_new_tokens", "8", "--out_dir", str(tmp_path)])
    for name in ("lens_0_logit_lens.png", "lens_0_logit_lens.pdf", "lens_0_tuned_lens.png", "lens_0_summary.png",
                 "lens_0.json", "lens_1_logit_lens.png", "dataset_lens.png", "dataset_lens.json", "dataset_lens.md",
                 "tuned_lens.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    numbers = json.loads((tmp_path / "lens_0.json").read_text())
    assert set(numbers["lenses"]) == {"logit lens", "tuned lens"}
    assert len(numbers["lenses"]["logit lens"]["prob"]) == 4


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "  "], "prompt 0 is empty"),
    (["--prompts", "['hi', '  ']"], "prompt 1 is empty"),
    (["--prompt", "x" * 300], "1 prompt(s) do not fit the model's window of 256 tokens with max_new_tokens 64 (the longest has 438 tokens; 192 fit): set --context truncate"),
    (["--prompt", "hi", "--layers", "2,7"], "exit layer 7 is out of range"),
    (["--prompt", "hi", "--max_new_tokens", "0"], "max_new_tokens = 0 is out of range: it must be an integer ≥ 1"),
    (["--index", "[99]", "--data.source", "{data}"], "--index 99: no valid record"),
    ([], "nothing to do"),
])
def test_bad_input(tiny_dir, data_file, tmp_path, extra, message, monkeypatch, capsys):
    extra = [e.format(data=data_file) for e in extra]
    argv = ["--model.name", tiny_dir, "--out_dir", str(tmp_path), *extra]
    assert message in refusal("lens", argv, monkeypatch, capsys)


def test_bad_input_in_a_real_process(tiny_dir, tmp_path):
    assert "nothing to do" in refusal_process("earlyexit.lens", ["--model.name", tiny_dir, "--out_dir", str(tmp_path)])


def test_one_prompt_is_taken_verbatim_and_the_list_form_keeps_commas():
    from earlyexit.lens import build_parser, prompt_texts

    parser = build_parser()
    assert prompt_texts(parser.parse_args(["--prompt", "Calculate the atomic mass for lithium."])) == [
        "Calculate the atomic mass for lithium."]
    assert prompt_texts(parser.parse_args(["--prompt", "[a, b]"])) == ["[a, b]"]  # one prompt, never split
    assert prompt_texts(parser.parse_args(["--prompt", "Add 2, 3 and 4."])) == ["Add 2, 3 and 4."]
    cfg = parser.parse_args(["--prompt", "first", "--prompts", '["Name a colour, please.", "Add 2, 3."]'])
    assert prompt_texts(cfg) == ["first", "Name a colour, please.", "Add 2, 3."]


def test_tokens_and_prompts_with_dollar_signs_and_invisible_characters_are_drawn_as_text(tmp_path):
    """A model may write "$$\\" (Gemma 3 did), read by matplotlib as TeX, or a lone byte-order mark (Qwen2.5 did), which
    the PDF backend has no glyph for: both failed while saving the figure."""
    import numpy as np

    from earlyexit.plotting import lens_heatmap

    tokens = ["$$\\", "$", " costs", " $5", "\\frac", "\ufeff", "a\u200bb"]
    fig = lens_heatmap(tokens, np.full((2, len(tokens)), 0.5), [1, 2], annotations=[tokens, tokens],
                       title="Price in $ and $$\ufeff")
    for name in ("lens.png", "lens.pdf"):
        fig.savefig(tmp_path / name)
        assert (tmp_path / name).stat().st_size > 1000
