"""Packing: rows laid into fixed-length sequences train exactly as padded rows (CPU, block-causal 4D mask)."""

import numpy as np
import pytest
import torch
from test_train_loop import _train, micro_rows  # noqa: F401  (the fixture)

from workloads.packing import block_causal_mask, first_fit_decreasing, pack_rows, packed_length
from workloads.segment_codes import Segment

S = Segment


def test_first_fit_decreasing_fills_few_bins_and_splits_no_row():
    lengths = [60, 25, 40, 33, 10, 64, 5]
    bins = first_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) == -(-sum(lengths) // 64) == 4  # as few as the total allows, here
    assert bins == [[5], [0], [2, 4, 6], [3, 1]]  # longest first, each into the first bin with room
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([65], 64)
    assert packed_length([60], 100) == 100 and packed_length([61]) == 64
    assert packed_length([60, 60, 60, 60]) == 64  # the longest row's length rounded up to a multiple of 8
    # [100, 50 + 50 + 30] in 2 x 136 = 272 positions beats 3 x 104 (312), 2 x 160 and 1 x 312
    assert packed_length([100, 50, 50, 30, 10]) == 136
    with pytest.raises(ValueError, match="packing_length=50"):
        packed_length([60], 50)


def test_packed_rows_restart_positions_and_are_never_targets_of_each_other():
    rows = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 27)]
    segments = [np.full(len(r), int(S.RESPONSE)) for r in rows]
    packed = pack_rows(rows, segments, pad_token_id=0, length=16)
    assert packed.input_ids.shape == (1, 16) and packed.row_order == [2, 0, 1]
    assert packed.input_ids[0].tolist() == [*range(20, 27), *range(1, 6), 10, 11, 12, 0]
    assert packed.position_ids[0].tolist() == [*range(7), *range(5), *range(3), 0]
    assert packed.sequence_ids[0].tolist() == [0] * 7 + [1] * 5 + [2] * 3 + [3]
    first = [0, 7, 12]  # each row's first token: a target of nothing, as unpacked
    assert [packed.segments[0, i] for i in first] == [int(S.PAD)] * 3
    assert (np.delete(packed.segments[0], first + [15]) == int(S.RESPONSE)).all()
    mask = block_causal_mask(torch.as_tensor(packed.sequence_ids), torch.float32)
    allowed = mask[0, 0] == 0
    assert allowed.shape == (16, 16) and allowed[8, 7] and allowed[8, 8] and not allowed[8, 9]
    assert not allowed[7, 6] and not allowed[12, 11] and allowed[15, 15] and allowed.sum(dim=1).min() == 1


def test_the_flat_layout_gives_flash_attention_the_row_boundaries():
    """FlashAttention's varlen path: transformers derives cu_seqlens from the flat row's position ids."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    from workloads.micro_batch import collate

    rows = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 27)]
    batch = {"input_ids": rows, "segments": [np.full(len(r), int(S.RESPONSE)) for r in rows]}
    flat = collate(batch, 0, torch.device("cpu"), packing=True, packing_length=9, flat=True)
    assert flat["attention_mask"] is None and flat["input_ids"].shape == (1, 18)  # [7 + filler 2][5 + 3 + filler 1]
    assert _is_packed_sequence(flat["position_ids"], 1)
    (cu_seqlens, _), (longest, _) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
    assert cu_seqlens.tolist() == [0, 7, 9, 14, 17, 18] and int(longest) == 7  # every row and filler its own span


def _model_rows(config, rng, lengths):
    rows = []
    for n in lengths:
        ids = rng.integers(5, 100, n)
        segments = np.full(n, int(S.INSTRUCTION))
        segments[0], segments[1] = int(S.SYSTEM), int(S.ROLE)
        ids[2:19], segments[2:19] = config.image_token_id, int(S.IMAGE)
        segments[24:26] = int(S.TASK_TEMPLATE)
        segments[n // 2 : -1] = int(S.RESPONSE)
        segments[-1] = int(S.END_OF_TURN)
        rows.append((ids, segments, rng.standard_normal((1, 3, 32, 32)).astype(np.float32)))
    return {"input_ids": [r[0] for r in rows], "segments": [r[1] for r in rows], "pixel_values": [r[2] for r in rows]}


def _loss_and_grads(model, batch, mode, li, la, normalize, kernel="chunked"):
    from workloads.forward import training_nll
    from workloads.loss import l2t_loss_from_nll, step_denominators

    weights = token_weights_of(batch["segments"], mode, li, la)
    denominators = step_denominators(batch["segments"], weights)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values") if k in batch}
    model.zero_grad()
    nll = training_nll(model, scored_index=batch["scored_index"], kernel=kernel, chunk_tokens=32, **inputs)
    parts = l2t_loss_from_nll(nll, batch["segments"], weights, denominators, normalize)
    parts.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return parts, denominators, grads


def token_weights_of(segments, mode, li, la):
    from workloads.segment_codes import token_weights

    return token_weights(segments, mode, li, la)


@pytest.fixture(scope="module")
def model_and_rows(tiny_model_dir):
    from workloads.model import load_model, prepare_for_training

    model = load_model(tiny_model_dir)
    prepare_for_training(model)  # train mode (the tiny preset has no dropout)
    rows = _model_rows(model.config, np.random.default_rng(0), [70, 33, 41, 90, 28, 55])
    return model, rows


@pytest.mark.parametrize(
    "mode, li, la, normalize",
    [("response", 1.0, 1.0, "tokens"), ("l2t", 0.5, 1.0, "tokens"), ("l2t_full", 0.5, 2.0, "per_part")],
)
@pytest.mark.parametrize("kernel", ["chunked", "full"])
def test_packed_and_padded_rows_give_the_same_loss_and_gradients(model_and_rows, mode, li, la, normalize, kernel):
    from workloads.micro_batch import collate

    model, rows = model_and_rows
    padded = collate(rows, 0, torch.device("cpu"))
    packed = collate(rows, 0, torch.device("cpu"), packing=True)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer sequences, fewer padded positions
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    want, want_d, want_grads = _loss_and_grads(model, padded, mode, li, la, normalize, kernel)
    got, got_d, got_grads = _loss_and_grads(model, packed, mode, li, la, normalize, kernel)
    assert got_d.tolist() == want_d.tolist()  # the same trained tokens, weights and parts
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-5, abs=1e-6)
    assert got.nll_response.item() == pytest.approx(want.nll_response.item(), rel=1e-5)
    assert got.nll_instruction.item() == pytest.approx(want.nll_instruction.item(), rel=1e-5)
    assert got.tokens_instruction == want.tokens_instruction and got.tokens_response == want.tokens_response
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_flat_layout_trains_as_padded_rows(model_and_rows):
    """FlashAttention's layout (one flat row, no mask) on CPU: transformers' SDPA mask finds the rows from the
    restarting position ids as FlashAttention's varlen path does, so the loss and gradients are the padded ones."""
    from workloads.micro_batch import collate

    model, rows = model_and_rows
    padded = collate(rows, 0, torch.device("cpu"))
    flat = collate(rows, 0, torch.device("cpu"), packing=True, flat=True)
    assert flat["input_ids"].shape[0] == 1 and flat["attention_mask"] is None
    want, _, want_grads = _loss_and_grads(model, padded, "l2t", 0.5, 1.0, "tokens")
    got, _, got_grads = _loss_and_grads(
        model, {k: v for k, v in flat.items() if v is not None}, "l2t", 0.5, 1.0, "tokens"
    )
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_without_the_block_mask_packing_would_leak_across_rows(model_and_rows):
    """The test above can fail: attention across packed rows, or images out of order, change the loss by
    10x more than its tolerance (rel 1e-5 of a loss near 5.7)."""
    from workloads.micro_batch import collate

    model, rows = model_and_rows
    packed = collate(rows, 0, torch.device("cpu"), packing=True)
    want = _loss_and_grads(model, packed, "l2t", 0.5, 1.0, "tokens")[0].loss.item()
    leaky = {**packed, "attention_mask": None, "position_ids": None}
    assert abs(_loss_and_grads(model, leaky, "l2t", 0.5, 1.0, "tokens")[0].loss.item() - want) > 2e-4
    shuffled = {**packed, "pixel_values": packed["pixel_values"].flip(0)}
    assert abs(_loss_and_grads(model, shuffled, "l2t", 0.5, 1.0, "tokens")[0].loss.item() - want) > 2e-4


@pytest.mark.parametrize("mode, li", [("response", 1.0), ("l2t", 0.5)])
def test_packed_training_takes_the_padded_steps(micro_rows, tiny_model_dir, tmp_path, mode, li):  # noqa: F811
    """run_training with train.packing: the same losses, gradient norms and final model as padded batches."""
    from transformers import AutoModelForImageTextToText

    from workloads.train_loop import MODEL_SUBDIR

    settings = dict(total_steps=3, micro_batch_size=8, gradient_accumulation=2, mode=mode, lambda_instruction=li)
    padded = _train(tiny_model_dir, micro_rows, tmp_path / "padded", **settings)
    packed = _train(tiny_model_dir, micro_rows, tmp_path / "packed", packing=True, **settings)
    for (a, _), (b, _) in zip(packed, padded):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["trained_tokens"] == b["trained_tokens"] and a["tokens"] == b["tokens"]
    ours = AutoModelForImageTextToText.from_pretrained(packed[-1][1] / MODEL_SUBDIR).state_dict()
    reference = AutoModelForImageTextToText.from_pretrained(padded[-1][1] / MODEL_SUBDIR).state_dict()
    # 3 Adam steps of lr 1e-3 move a weight by up to 3e-3; packing sums in another float order, and Adam's
    # normalized update turns that noise in near-zero gradients into weight differences of ~1e-5
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=5e-5, msg=name)
