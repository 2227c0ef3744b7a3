"""Sequence packing: a packed batch trains on the same loss, per exit, with the same gradients as the padded batch."""

import dataclasses

import pytest
import torch

from earlyexit.data import packed_batch, pack_rows
from earlyexit.tokens import IGNORE_INDEX, pad
from earlyexit.loading import ModelArgs
from earlyexit.module import EarlyExitModule, ExitLossArgs, LoraArgs
from tests.tiny import PAD, TINY_CONFIGS, save_tiny


def test_pack_rows_fills_rows_up_to_capacity_and_uses_every_example_once():
    lengths = [7, 3, 5, 2, 9, 4, 1]
    rows = pack_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 31 tokens need at least 4 rows of 10; first fit, longest first finds 4
    assert all(row == sorted(row) for row in rows)
    assert pack_rows([12, 3], 10) == [[0], [1]]  # an over-long example gets its own row


def test_packed_batch_restarts_positions_and_keeps_labels_of_each_example():
    examples = [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]},
                {"input_ids": [4, 5], "labels": [IGNORE_INDEX, 5]},
                {"input_ids": [6, 7, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 8, 9]}]
    batch = packed_batch(examples, capacity=6, pad_id=0)
    assert batch["attention_mask"] is None
    # longest first: [6..9] opens row 0, [1, 2, 3] does not fit beside it and opens row 1, [4, 5] joins row 0
    assert batch["input_ids"].tolist() == [[4, 5, 6, 7, 8, 9], [1, 2, 3, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, 8, 9], [IGNORE_INDEX, 2, 3] + [IGNORE_INDEX] * 3]


def _examples(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, answer = int(torch.randint(2, 6, (1,), generator=gen)), int(torch.randint(1, 7, (1,), generator=gen))
        ids = torch.randint(5, 60, (prompt + answer,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def _loss_and_grads(module: EarlyExitModule, batch: dict):
    module.zero_grad(set_to_none=True)
    out, _ = module._loss(batch, step=0, train=True)
    out.total.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad and p.grad is not None}
    return out, grads


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_packed_loss_and_gradients_equal_the_padded_batch(family, fused, tmp_path):
    """The reference is the padded batch with the checkpointed loss; packed, with the reference or the fused loss."""
    torch.manual_seed(0)
    module = EarlyExitModule(base=ModelArgs(name=save_tiny(tmp_path / family, family), device="cpu", dtype="float32"),
                             lora=LoraArgs(r=2), loss=ExitLossArgs(exit_layers="all", weights="sum_l", distill=0.5, chunk_size=7))
    with torch.no_grad():  # LoRA B starts at 0: move it, so the adapted model differs from the teacher (adapters off)
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    examples = _examples(6, seed=len(family))
    padded = {"input_ids": pad([e["input_ids"] for e in examples], PAD, "right"),
              "attention_mask": pad([[1] * len(e["input_ids"]) for e in examples], 0, "right"),
              "labels": pad([e["labels"] for e in examples], IGNORE_INDEX, "right")}
    packed = packed_batch(examples, capacity=16, pad_id=PAD)
    assert packed["input_ids"].shape[0] < len(examples)  # it did pack
    ref, ref_grads = _loss_and_grads(module, padded)
    module.loss_args = dataclasses.replace(module.loss_args, fused=fused)
    got, got_grads = _loss_and_grads(module, packed)
    assert got.per_exit.keys() == ref.per_exit.keys() == {1, 2, 3, 4}
    for layer in ref.per_exit:
        assert got.per_exit[layer].item() == pytest.approx(ref.per_exit[layer].item(), abs=1e-3)
    assert got.total.item() == pytest.approx(ref.total.item(), abs=1e-3)
    assert ref_grads.keys() == got_grads.keys() and ref_grads
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)
