"""The chunked LM-head loss: exact against full logits (values and gradients, float32 on CPU), same λ loss."""

import numpy as np
import pytest
import torch

from workloads.loss import (
    chunked_nll,
    l2t_loss,
    l2t_loss_from_nll,
    liger_problem,
    scored_targets,
    step_denominators,
    token_nll,
)
from workloads.masking_config import NORMALIZATIONS
from workloads.segment_codes import Segment, token_weights

S = Segment


def _rows(seed=0, rows=3, length=40, vocab=500, hidden=16):
    """Hidden states, a head and ids with image, instruction, response and pad targets."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    hidden_states = torch.randn(rows, length, hidden, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=True)
    ids = torch.as_tensor(rng.integers(0, vocab, size=(rows, length)))
    segments = np.full((rows, length), int(S.INSTRUCTION))
    segments[:, 0], segments[:, 1], segments[:, 2:8] = int(S.SYSTEM), int(S.ROLE), int(S.IMAGE)
    segments[:, 12] = int(S.TASK_TEMPLATE)
    for r in range(rows):
        segments[r, 20 : 30 + r] = int(S.RESPONSE)
        segments[r, 30 + r] = int(S.END_OF_TURN)
        segments[r, 31 + r :] = int(S.PAD)
    return hidden_states, head, ids, torch.as_tensor(segments)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_nll_equals_full_logits_values_and_gradients(chunk):
    hidden, head, ids, _ = _rows()
    flat = hidden[:, :-1].reshape(-1, hidden.size(-1))
    targets = ids[:, 1:].reshape(-1)
    weights = torch.rand(targets.shape)
    full = token_nll(head(hidden), ids).reshape(-1)
    chunked = chunked_nll(flat, head, targets, chunk)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    want = _grads((full * weights).sum(), hidden, head.weight, head.bias)
    got = _grads((chunked * weights).sum(), hidden, head.weight, head.bias)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunks_are_recomputed_in_backward_not_stored():
    """Checkpointed: the head runs once per chunk forward and once more per chunk in backward."""
    hidden, head, ids, _ = _rows()
    calls = []
    head.register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    flat = hidden[:, :-1].reshape(-1, hidden.size(-1))
    nll = chunked_nll(flat, head, ids[:, 1:].reshape(-1), 50)
    chunks = -(-flat.size(0) // 50)
    assert len(calls) == chunks and max(calls) == 50
    nll.sum().backward()
    assert len(calls) == 2 * chunks
    with torch.no_grad():
        chunked_nll(flat, head, ids[:, 1:].reshape(-1), 50)
    assert len(calls) == 3 * chunks  # no graph, no checkpoint


def test_no_scored_target_still_gives_a_graph():
    hidden, head, ids, _ = _rows()
    nll = chunked_nll(hidden[0, :0], head, ids[0, :0], 16)
    assert nll.shape == (0,) and nll.requires_grad
    nll.sum().backward()
    assert torch.all(head.weight.grad == 0)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("mode", ["response", "l2t_full", "l2t"])
def test_the_lambda_loss_is_the_same_from_scored_chunks(normalize, mode):
    """Scoring only instruction/response targets, in chunks, gives the λ loss, its gradient and the reported
    per-part sums of full logits, for every normalization."""
    hidden, head, ids, segments = _rows()
    w = token_weights(segments, mode, 0.5, 2.0)
    d = step_denominators(segments, w)
    want = l2t_loss(head(hidden), ids, segments, w, d, normalize)
    scored = scored_targets(segments).reshape(-1)
    index = torch.nonzero(scored).view(-1)
    assert 0 < index.numel() < scored.numel()  # image and pad targets are skipped
    flat = hidden[:, :-1].reshape(-1, hidden.size(-1)).index_select(0, index)
    nll = chunked_nll(flat, head, ids[:, 1:].reshape(-1).index_select(0, index), 13)
    every = torch.zeros(scored.numel()).index_copy(0, index, nll).view(ids.size(0), -1)
    got = l2t_loss_from_nll(every, segments, w, d, normalize)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)
    for field in ("nll_instruction", "nll_response"):
        assert getattr(got, field).item() == pytest.approx(getattr(want, field).item(), rel=1e-6)
    for field in ("tokens_instruction", "tokens_response"):
        assert getattr(got, field).item() == getattr(want, field).item()
    for a, b in zip(_grads(got.loss, hidden, head.weight), _grads(want.loss, hidden, head.weight)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_model_forward_gives_the_same_nll_whichever_kernel(tiny_model_dir):
    """The tiny LLaVA: base model + chunked head == the model's own forward (full logits), with gradients."""
    from workloads.forward import training_nll
    from workloads.micro_batch import collate
    from workloads.model import load_model

    model = load_model(tiny_model_dir)
    config = model.config
    rng = np.random.default_rng(0)
    rows = []
    for n in (40, 25, 33):
        ids = rng.integers(5, 100, n)
        segments = np.full(n, int(S.INSTRUCTION))
        ids[2:19], segments[2:19] = config.image_token_id, int(S.IMAGE)
        segments[n // 2 :] = int(S.RESPONSE)
        rows.append((ids, segments, rng.standard_normal((1, 3, 32, 32)).astype(np.float32)))
    batch = collate(
        {"input_ids": [r[0] for r in rows], "segments": [r[1] for r in rows], "pixel_values": [r[2] for r in rows]},
        0,
        torch.device("cpu"),
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    scored = scored_targets(batch["segments"])
    results = {}
    for kernel, chunk in (("full", 0), ("chunked", 16), ("chunked", 0)):
        model.zero_grad()
        nll = training_nll(model, scored_index=batch["scored_index"], kernel=kernel, chunk_tokens=chunk, **inputs)
        (nll * scored).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[(kernel, chunk)] = (nll * scored, grads)
    want_nll, want_grads = results[("full", 0)]
    for key, (nll, grads) in results.items():
        torch.testing.assert_close(nll, want_nll, rtol=1e-5, atol=1e-6, msg=str(key))
        assert set(grads) == set(want_grads)
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=f"{key} {name}")


def test_liger_is_refused_with_a_reason_where_it_cannot_run(tiny_model_dir):
    from workloads.forward import check_loss_kernel
    from workloads.model import load_model

    model = load_model(tiny_model_dir)
    check_loss_kernel("chunked", model, use_gpu=False, zero_stage=3)
    check_loss_kernel("full", model, use_gpu=False, zero_stage=3)
    with pytest.raises(ValueError, match="train.loss_kernel=liger: Liger's kernels need a GPU"):
        check_loss_kernel("liger", model, use_gpu=False, zero_stage=2)
    problem = liger_problem()
    if problem is not None:  # no liger-kernel here (a CPU machine): the GPU run names the missing package
        assert "liger-kernel" in problem
        with pytest.raises(ValueError, match="liger-kernel"):
            check_loss_kernel("liger", model, use_gpu=True, zero_stage=2)
    model.config.text_config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        check_loss_kernel("chunked", model, use_gpu=False, zero_stage=2)
