import time

import pytest
import torch

from earlyexit.errors import EarlyExitError
from earlyexit.loading import ModelArgs, load_model
from earlyexit.names import resolve_model_path
from earlyexit.model import EarlyExitHead
from tiny import save_tiny


def test_local_directory_loads_in_eval_mode(tmp_path):
    model, tok = load_model(ModelArgs(name=save_tiny(tmp_path / "m"), device="cpu"))
    assert not model.training and model.dtype == torch.float32 and tok.padding_side == "left"


def test_dtype_override(tmp_path):
    model, _ = load_model(ModelArgs(name=save_tiny(tmp_path / "m"), device="cpu", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("name, message", [
    ("./missing", "does not exist"),
    ("/abs/missing", "does not exist"),
])
def test_missing_paths(name, message):
    with pytest.raises(EarlyExitError, match=message):
        resolve_model_path(name)


def test_tiny_random_models_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path))
    model, tok = load_model(ModelArgs(name="tiny-random-gpt2", device="cpu"))
    assert model.config.model_type == "gpt2" and sum(p.numel() for p in model.parameters()) < 1_000_000
    with pytest.raises(EarlyExitError, match="no tiny model 'tiny-random-bert'"):
        resolve_model_path("tiny-random-bert")


def test_directory_without_config(tmp_path):
    with pytest.raises(EarlyExitError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_adapter_reloads(tmp_path):
    from peft import LoraConfig, get_peft_model

    path = save_tiny(tmp_path / "m")
    base, _ = load_model(ModelArgs(name=path, device="cpu"))
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 100, (1, 7))
    expected = EarlyExitHead(peft_model)(ids, exit_layer=2)
    loaded, _ = load_model(ModelArgs(name=path, device="cpu", adapter=str(tmp_path / "adapter")))
    torch.testing.assert_close(EarlyExitHead(loaded)(ids, exit_layer=2), expected)
    with pytest.raises(EarlyExitError, match="adapter path"):
        load_model(ModelArgs(name=path, device="cpu", adapter=str(tmp_path / "nope")))


@pytest.mark.integration
def test_smollm2_loads_offline_and_the_cache_reloads_fast(smollm2, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    start = time.perf_counter()
    load_model(ModelArgs(device="cpu"))
    assert time.perf_counter() - start < 2.0


@pytest.mark.integration
def test_smollm2_greedy_at_every_exit_matches_references(smollm2):
    """L = 30 equals HF generate; L = 15 equals a naive no-cache loop over block 15's output."""
    model, tok = smollm2
    ee = EarlyExitHead(model)
    prompts = ["Calculate the atomic mass for lithium.", "Name three primary colours."]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ours = ee.generate(batch.input_ids, batch.attention_mask, exit_layer=30, max_new_tokens=24)
    ref = model.generate(**batch, max_new_tokens=24, do_sample=False)[:, batch.input_ids.shape[1]:]
    for row in range(2):
        n = int(ours.n_tokens[row])
        assert ours.tokens[row, :n].tolist() == ref[row, :n].tolist()
        assert ours.finished[row] == (ref[row, n] == tok.eos_token_id) if n < 24 else True
    early = ee.generate(batch.input_ids[:1], batch.attention_mask[:1], exit_layer=15, max_new_tokens=8, ignore_eos=True)
    ids = batch.input_ids[:1]
    for step in range(8):
        hidden = ee.hidden_states(ids, exit_layers=[15])[15]
        logits = ee.exit_logits(hidden[:, -1])
        logits[:, tok.eos_token_id] = -float("inf")
        nxt = logits.argmax(-1)
        assert nxt.item() == early.tokens[0, step].item()
        ids = torch.cat([ids, nxt[:, None]], 1)


def test_publish_keeps_the_directory_another_process_finished_first(tmp_path):
    """Two processes converting the same model at once: the second rename finds the first one's directory."""
    from earlyexit.catalog import publish

    def staged(name, text):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(text)
        return path

    target = tmp_path / "model"
    publish(staged("a", "first"), target, "config.json")
    assert (target / "config.json").read_text() == "first"
    publish(staged("b", "second"), target, "config.json")  # lost the race: no error, the winner's files stay
    assert (target / "config.json").read_text() == "first"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "junk").write_text("x")
    with pytest.raises(OSError):  # something else is in the way: not hidden
        publish(staged("c", "third"), broken, "config.json")
