import json

import pytest
import torch

from earlyexit.data import (
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    AlpacaDataModule,
    encode_examples,
    pad,
    read_records,
    render_prompt,
    validate,
)
from earlyexit.errors import EarlyExitError
from tiny import char_tokenizer

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "", "input": "", "output": "x"},  # empty instruction
    {"instruction": "Say hi.", "input": 3, "output": "hi"},  # non-string input
    {"instruction": "Say hi.", "output": "hi"},  # missing input
    {"instruction": "Say hi.", "input": "", "output": "  "},  # empty output
] + [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i}"} for i in range(20)]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(RECORDS))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def test_bad_records_are_counted_with_their_reasons():
    out = validate(RECORDS)
    assert len(out.records) == 22 and out.ids[:2] == [0, 1]
    assert out.bad == {2: "empty 'instruction'", 3: "field 'input' is int, not a string",
                       4: "missing field 'input'", 5: "empty 'output'"}


def test_strict_fails_on_the_first_bad_record_with_its_index():
    with pytest.raises(EarlyExitError, match="record 2: empty 'instruction'"):
        validate(RECORDS, strict=True)


def test_alpaca_template(tokenizer):
    assert render_prompt(RECORDS[0], tokenizer, "alpaca") == ALPACA_PROMPT_NO_INPUT.format(**RECORDS[0])
    with_input = render_prompt(RECORDS[1], tokenizer, "alpaca")
    assert "### Input:\n2 and 3\n\n### Response:\n" in with_input
    assert render_prompt(RECORDS[0], tokenizer, "auto") == render_prompt(RECORDS[0], tokenizer, "alpaca")  # no chat template
    with pytest.raises(EarlyExitError, match="no chat template"):
        render_prompt(RECORDS[0], tokenizer, "chat")


def test_chat_template_is_used_for_instruct_tokenizers(tokenizer):
    from copy import deepcopy

    chat = deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert render_prompt(RECORDS[1], chat, "auto") == "<user>Add the numbers.\n\n2 and 3<assistant>"
    assert render_prompt(RECORDS[1], chat, "alpaca").startswith("Below is an instruction")


def test_labels_mask_the_prompt(tokenizer):
    (example,) = encode_examples([RECORDS[1]], tokenizer, "alpaca", max_length=512)
    n_prompt = sum(label == IGNORE_INDEX for label in example["labels"])
    answer = example["input_ids"][n_prompt:]
    assert tokenizer.decode(answer) == "5</s>"
    assert example["labels"][n_prompt:] == answer
    assert tokenizer.decode(example["input_ids"][:n_prompt]).endswith("### Response:\n")
    (short,) = encode_examples([RECORDS[1]], tokenizer, "alpaca", max_length=10)
    assert len(short["input_ids"]) == len(short["labels"]) == 10
    assert encode_examples([], tokenizer) == []


@pytest.mark.parametrize("template", ["auto", "alpaca"])
def test_batched_encoding_gives_the_ids_of_one_call_a_text(smollm2, alpaca_path, template):
    """The real tokenizer (its chat template under auto) on 300 records of the shipped sample, some truncated."""
    _, tok = smollm2
    records = read_records(alpaca_path)[:300]
    special = template == "alpaca"  # a chat template writes its own special tokens
    for record, example in zip(records, encode_examples(records, tok, template, max_length=96)):
        prompt = tok(render_prompt(record, tok, template), add_special_tokens=special)["input_ids"]
        answer = tok(record["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert example == {"input_ids": (prompt + answer)[:96], "labels": ([IGNORE_INDEX] * len(prompt) + answer)[:96]}


def test_pad_sides():
    assert pad([[1, 2], [3]], 0, "left").tolist() == [[1, 2], [0, 3]]
    assert pad([[1, 2], [3]], 0, "right").tolist() == [[1, 2], [3, 0]]


def test_splits_are_seeded_and_disjoint(data_file, tokenizer):
    def build(seed):
        dm = AlpacaDataModule(str(data_file), template="alpaca", eval_size=5, val_size=4, batch_size=3, seed=seed)
        dm.attach_tokenizer(tokenizer)
        dm.setup("fit")
        dm.setup("predict")
        return dm

    a, b, c = build(0), build(0), build(1)
    assert a.train_set == b.train_set and a.val_set == b.val_set
    assert a.train_set != c.train_set
    assert [ex["id"] for ex in a.predict_set] == [0, 1, 6, 7, 8]  # source indices, bad records skipped
    train_text = {tokenizer.decode(ex["input_ids"]) for ex in a.train_set + a.val_set}
    for ex in a.predict_set:
        assert not any(tokenizer.decode(ex["prompt_ids"]) in t for t in train_text)
    assert len(a.train_set) + len(a.val_set) == 22 - 5
    batch = next(iter(a.predict_dataloader()))
    assert batch["ids"] == [0, 1, 6] and batch["attention_mask"][:, -1].all()
    assert (batch["attention_mask"].sum(1) == torch.tensor([len(ex["prompt_ids"]) for ex in a.predict_set[:3]])).all()
    train = next(iter(a.train_dataloader()))
    assert train["input_ids"].shape == train["labels"].shape



def test_one_record_a_prompt_splits_as_shuffling_the_records(data_file, tokenizer):
    """Grouping by prompt changes nothing for data with one answer a prompt (every shipped result stays reproducible):
    the split equals shuffling the records themselves."""
    import random

    from earlyexit.tokens import supervised_tokens

    dm = AlpacaDataModule(str(data_file), template="alpaca", eval_size=5, val_size=4, batch_size=3, seed=3)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    rest = validate(RECORDS).records[5:]
    random.Random(3).shuffle(rest)
    kept = [e for e in encode_examples(rest, tokenizer, "alpaca", dm.hparams.max_length) if supervised_tokens(e)]
    assert dm.val_set == kept[:4] and dm.train_set == kept[4:]


def test_answers_to_one_prompt_stay_on_one_side_of_the_split(tmp_path, tokenizer):
    """Several answers to one prompt (sampled self-answers) go all to validation or all to training."""
    records = [{"instruction": f"Count to {i}.", "input": "", "output": f"{'1 ' * k}{i}"} for i in range(12) for k in range(3)]
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(records))
    dm = AlpacaDataModule(str(path), template="alpaca", eval_size=0, val_size=4, batch_size=3, seed=0)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    prompt = lambda ex: tokenizer.decode(ex["input_ids"]).split("### Response:")[0]  # noqa: E731
    val, train = {prompt(ex) for ex in dm.val_set}, {prompt(ex) for ex in dm.train_set}
    assert not val & train and len(val) == 2 and len(dm.val_set) == 6  # 4 asked for: two whole prompts of 3 answers
    assert len(dm.val_set) + len(dm.train_set) == 36

def test_evaluation_slice(data_file):
    dm = AlpacaDataModule(str(data_file), eval_size=5, offset=1, limit=2)
    assert [i for i, _ in dm.eval_records()] == [1, 6]
    with pytest.raises(EarlyExitError, match="empty evaluation slice"):
        AlpacaDataModule(str(data_file), eval_size=5, offset=10).eval_records()


def test_jsonl_source(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n")
    assert read_records(str(path)) == RECORDS[:2]


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", ', "malformed JSON at line 1"),
    ('{"instruction": "a"}', "expected a JSON list"),
])
def test_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(EarlyExitError, match=message):
        read_records(str(path))


def test_missing_file():
    with pytest.raises(EarlyExitError, match="not found"):
        read_records("no/such/alpaca_data.json")


def test_real_alpaca_sample(alpaca_path):
    out = validate(read_records(alpaca_path))
    assert len(out.records) + len(out.bad) == 5000 and len(out.bad) == 2
