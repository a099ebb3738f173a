"""The λ loss: normalized by the step's trained-token count, however the batch is split."""

import numpy as np
import pytest
import torch

from workloads.loss import count_trained_tokens, l2t_loss
from workloads.segment_codes import Segment, token_weights

S = Segment


def _batch(seed=0, rows=8, length=12, vocab=17):
    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.integers(0, vocab, size=(rows, length)))
    segments = np.full((rows, length), int(S.INSTRUCTION))
    segments[:, 0] = int(S.SYSTEM)
    segments[:, 1] = int(S.ROLE)
    segments[:, 2:4] = int(S.IMAGE)
    segments[:, 6] = int(S.TASK_TEMPLATE)
    for r in range(rows):  # unequal numbers of response tokens per row, then padding
        answer = 1 + (r // 2) % 4
        segments[r, 7 : 7 + answer] = int(S.RESPONSE)
        segments[r, 7 + answer] = int(S.END_OF_TURN)
        segments[r, 8 + answer :] = int(S.PAD)
    return ids, torch.as_tensor(segments)


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=17, hidden=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


def _step_gradient(model, ids, segments, split, mode="l2t", li=1.0, la=1.0):
    """Gradient of one optimizer step whose batch is split into `split` micro-batches."""
    model.zero_grad()
    chunks = list(zip(ids.chunk(split), segments.chunk(split)))
    weights = [token_weights(s, mode, li, la) for _, s in chunks]
    n = sum(count_trained_tokens(w) for w in weights)
    total = 0.0
    for (i, s), w in zip(chunks, weights):
        parts = l2t_loss(model(i), i, s, w, n)
        parts.loss.backward()
        total += parts.loss.item()
    return total, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("split", [2, 4, 8])
def test_split_batches_give_the_same_loss_and_gradient(split):
    model = TinyLM()
    ids, segments = _batch()
    loss_full, grads_full = _step_gradient(model, ids, segments, 1)
    loss_split, grads_split = _step_gradient(model, ids, segments, split)
    assert loss_split == pytest.approx(loss_full, rel=1e-6)
    for a, b in zip(grads_full, grads_split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_mean_of_micro_batch_means_would_differ():
    """The normalization matters: averaging per-micro-batch means is not the same objective."""
    model = TinyLM()
    ids, segments = _batch()
    w = token_weights(segments, "response")
    full = l2t_loss(model(ids), ids, segments, w, count_trained_tokens(w)).loss.item()
    halves = [
        l2t_loss(
            model(i), i, s, token_weights(s, "response"), count_trained_tokens(token_weights(s, "response"))
        ).loss.item()
        for i, s in zip(ids.chunk(2), segments.chunk(2))
    ]
    assert abs(np.mean(halves) - full) > 1e-4


def test_lambda_instruction_zero_is_exactly_response_only():
    model = TinyLM()
    ids, segments = _batch()
    loss_l2t, grads_l2t = _step_gradient(model, ids, segments, 2, mode="l2t", li=0.0, la=1.0)
    loss_vit, grads_vit = _step_gradient(model, ids, segments, 2, mode="response")
    assert loss_l2t == pytest.approx(loss_vit, rel=1e-7)
    for a, b in zip(grads_l2t, grads_vit):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_zero_weight_tokens_get_no_gradient():
    model = TinyLM()
    ids, segments = _batch()
    logits = model(ids).detach().requires_grad_(True)
    w = token_weights(segments, "l2t_no_template")
    l2t_loss(logits, ids, segments, w, count_trained_tokens(w)).loss.backward()
    # logits[:, t] predict token t+1: their gradient is zero exactly where weight[t+1] == 0.
    untrained = w[:, 1:] == 0
    grad = logits.grad[:, :-1]
    assert torch.all(grad[untrained] == 0)
    assert torch.all(grad[~untrained].abs().sum(-1) > 0)
    assert torch.all(logits.grad[:, -1] == 0)


def test_lambdas_scale_the_groups():
    model = TinyLM()
    ids, segments = _batch()
    logits = model(ids).detach()
    n = 100
    base_i = l2t_loss(logits, ids, segments, token_weights(segments, "l2t", 1.0, 0.0), n).loss.item()
    base_a = l2t_loss(logits, ids, segments, token_weights(segments, "l2t", 0.0, 1.0), n).loss.item()
    mixed = l2t_loss(logits, ids, segments, token_weights(segments, "l2t", 0.3, 2.0), n).loss.item()
    assert mixed == pytest.approx(0.3 * base_i + 2.0 * base_a, rel=1e-5)


def test_reported_group_losses_ignore_weights():
    model = TinyLM()
    ids, segments = _batch()
    logits = model(ids).detach()
    a = l2t_loss(logits, ids, segments, token_weights(segments, "response"), 10)
    b = l2t_loss(logits, ids, segments, token_weights(segments, "l2t", 0.5, 3.0), 10)
    assert a.nll_instruction.item() == pytest.approx(b.nll_instruction.item())
    assert a.tokens_response.item() == b.tokens_response.item() > 0
