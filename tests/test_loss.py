"""The λ loss: the mode ladder, per-segment weights and the three normalizations, however the batch is split."""

import copy
import math

import numpy as np
import pytest
import torch

from workloads.loss import count_trained_tokens, l2t_loss, step_denominators, token_nll
from workloads.masking_config import NORMALIZATIONS, SegmentWeights
from workloads.segment_codes import (
    MASKING_MODES,
    WEIGHTED_SEGMENTS,
    Segment,
    segment_weight_table,
    token_weights,
)

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


def _step_gradient(model, ids, segments, split, mode="l2t_full", li=1.0, la=1.0):
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
    loss_l2t, grads_l2t = _step_gradient(model, ids, segments, 2, mode="l2t_full", li=0.0, la=1.0)
    loss_vit, grads_vit = _step_gradient(model, ids, segments, 2, mode="response")
    assert loss_l2t == pytest.approx(loss_vit, rel=1e-7)
    for a, b in zip(grads_l2t, grads_vit):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_zero_weight_tokens_get_no_gradient():
    model = TinyLM()
    ids, segments = _batch()
    logits = model(ids).detach().requires_grad_(True)
    w = token_weights(segments, "l2t")
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
    base_i = l2t_loss(logits, ids, segments, token_weights(segments, "l2t_full", 1.0, 0.0), n).loss.item()
    base_a = l2t_loss(logits, ids, segments, token_weights(segments, "l2t_full", 0.0, 1.0), n).loss.item()
    mixed = l2t_loss(logits, ids, segments, token_weights(segments, "l2t_full", 0.3, 2.0), n).loss.item()
    assert mixed == pytest.approx(0.3 * base_i + 2.0 * base_a, rel=1e-5)


def test_reported_group_losses_ignore_weights():
    model = TinyLM()
    ids, segments = _batch()
    logits = model(ids).detach()
    a = l2t_loss(logits, ids, segments, token_weights(segments, "response"), 10)
    b = l2t_loss(logits, ids, segments, token_weights(segments, "l2t_full", 0.5, 3.0), 10)
    assert a.nll_instruction.item() == pytest.approx(b.nll_instruction.item())
    assert a.tokens_response.item() == b.tokens_response.item() > 0


# ---------------------------------------------------------------- the ladder and per-segment weights


def test_the_ladder_tables():
    li, la = 0.25, 1.75
    expected = {  # system, role, instruction, task_template, response, end_of_turn; image and pad 0 always
        "response": (0, 0, 0, 0, la, la),
        "l2t_full": (li, li, li, li, la, la),
        "l2t_no_system": (0, 0, li, li, la, la),
        "l2t": (0, 0, li, 0, la, la),
        "l2t_visual": (0, 0, li, 0, la, la),  # each instruction weight then × g(relevance) (test_visual_relevance)
    }
    assert tuple(expected) == MASKING_MODES
    for mode, row in expected.items():
        table = segment_weight_table(mode, li, la)
        assert table.dtype == np.float32 and table[S.IMAGE] == 0 and table[S.PAD] == 0
        assert [table[s] for s in WEIGHTED_SEGMENTS] == [np.float32(w) for w in row], mode


def test_old_mode_names_are_refused_with_the_new_name():
    with pytest.raises(ValueError, match="'l2t_no_template' \\(renamed 'l2t'\\)"):
        segment_weight_table("l2t_no_template", 1.0, 1.0)


def test_per_segment_weights_replace_the_mode_entry_absolutely():
    table = segment_weight_table("response", 0.5, 2.0, {"instruction": 0.3, "response": None, "end_of_turn": 1.0})
    assert table[S.INSTRUCTION] == np.float32(0.3)  # not scaled by λ_I
    assert table[S.RESPONSE] == np.float32(2.0)  # None keeps the mode's entry
    assert table[S.END_OF_TURN] == np.float32(1.0)  # replaces λ_A
    assert table[S.SYSTEM] == table[S.ROLE] == table[S.TASK_TEMPLATE] == table[S.IMAGE] == table[S.PAD] == 0
    zeroed = segment_weight_table("l2t_full", 1.0, 1.0, {"system": 0.0})
    assert zeroed[S.SYSTEM] == 0 and zeroed[S.ROLE] == 1
    # The config section's keys are exactly the overridable segments; all unset is the mode's table.
    assert set(SegmentWeights().model_dump()) == {s.name.lower() for s in WEIGHTED_SEGMENTS}
    for mode in MASKING_MODES:
        assert np.array_equal(
            segment_weight_table(mode, 0.5, 2.0, SegmentWeights().model_dump()), segment_weight_table(mode, 0.5, 2.0)
        )
    ids = np.array([[S.SYSTEM, S.INSTRUCTION, S.IMAGE, S.RESPONSE]])
    assert token_weights(ids, "l2t", 0.5, 2.0, {"system": 0.1}).tolist() == [[np.float32(0.1), 0.5, 0.0, 2.0]]
    with pytest.raises(ValueError, match="no per-segment weight for 'image'"):
        segment_weight_table("l2t", 1.0, 1.0, {"image": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        segment_weight_table("l2t", 1.0, 1.0, {"role": -1.0})


# ---------------------------------------------------------------- normalizations: hand-worked examples

LN2 = math.log(2.0)
# Targets after the causal shift (position 0 is BOS, never a target): segment and nll in units of ln 2.
EXAMPLE = [
    (S.INSTRUCTION, 1),
    (S.INSTRUCTION, 3),
    (S.TASK_TEMPLATE, 2),
    (S.IMAGE, 5),
    (S.RESPONSE, 1),
    (S.RESPONSE, 2),
    (S.END_OF_TURN, 3),
]


def _example():
    """One row whose token t is predicted with probability 2^-nll_t: logits are log-probabilities."""
    vocab = 4
    segments = torch.tensor([[int(S.SYSTEM)] + [int(seg) for seg, _ in EXAMPLE]])
    ids = torch.tensor([[0] + [i % vocab for i in range(1, len(EXAMPLE) + 1)]])
    logits = torch.zeros(1, len(EXAMPLE) + 1, vocab, dtype=torch.float64)
    for t, (_, nll) in enumerate(EXAMPLE):
        target = int(ids[0, t + 1])
        probs = torch.full((vocab,), (1 - 2.0**-nll) / (vocab - 1), dtype=torch.float64)
        probs[target] = 2.0**-nll
        logits[0, t] = probs.log()
    return logits.float(), ids, segments


# mode l2t, λ_I = 0.5, λ_A = 2: weights 0.5, 0.5, 0 (template), 0 (image), 2, 2, 2
#   Σ w·nll = 0.5·(1 + 3) + 2·(1 + 2 + 3) = 14;  N = 5, Σw = 7, N_I = 2, N_A = 3
#   tokens: 14 / 5;  weight: 14 / 7 = 2;  per_part: 2 / 2 + 12 / 3 = 5 = λ_I·mean_I + λ_A·mean_A = 0.5·2 + 2·2
# with weights.task_template = 1 (absolute): weights 0.5, 0.5, 1, 0, 2, 2, 2
#   Σ w·nll = 16;  N = 6, Σw = 8, N_I = 3, N_A = 3;  tokens: 16 / 6;  weight: 2;  per_part: 4 / 3 + 12 / 3
HAND_WORKED = [
    ("tokens", None, 14 / 5),
    ("weight", None, 2.0),
    ("per_part", None, 5.0),
    ("tokens", {"task_template": 1.0}, 16 / 6),
    ("weight", {"task_template": 1.0}, 2.0),
    ("per_part", {"task_template": 1.0}, 16 / 3),
]


@pytest.mark.parametrize(("normalize", "overrides", "want"), HAND_WORKED)
def test_hand_worked_example(normalize, overrides, want):
    logits, ids, segments = _example()
    torch.testing.assert_close(token_nll(logits, ids)[0] / LN2, torch.tensor([float(n) for _, n in EXAMPLE]))
    w = token_weights(segments, "l2t", 0.5, 2.0, overrides)
    denominators = step_denominators(segments, w)
    n_i = 3 if overrides else 2
    assert denominators.tolist() == [n_i + 3, (8.0 if overrides else 7.0), n_i, 3]
    parts = l2t_loss(logits, ids, segments, w, denominators, normalize)
    assert parts.loss.item() / LN2 == pytest.approx(want, rel=1e-6)
    # reported: mean nll per side, whatever the weights (image is on neither side)
    assert parts.nll_instruction.item() / LN2 == pytest.approx(6.0, rel=1e-6) and parts.tokens_instruction == 3
    assert parts.nll_response.item() / LN2 == pytest.approx(6.0, rel=1e-6) and parts.tokens_response == 3


def test_a_part_without_trained_tokens_contributes_nothing():
    logits, ids, segments = _example()
    w = token_weights(segments, "response", 0.5, 2.0)  # N_I = 0
    d = step_denominators(segments, w)
    per_part = l2t_loss(logits, ids, segments, w, d, "per_part").loss.item() / LN2
    assert per_part == pytest.approx(2.0 * 6 / 3, rel=1e-6)  # λ_A · mean_A
    assert l2t_loss(logits, ids, segments, w, d, "tokens").loss.item() / LN2 == pytest.approx(per_part, rel=1e-6)
    assert l2t_loss(logits, ids, segments, w, d, "weight").loss.item() / LN2 == pytest.approx(2.0, rel=1e-6)
    nothing = torch.zeros_like(w)
    for normalize in NORMALIZATIONS:
        loss = l2t_loss(logits, ids, segments, nothing, step_denominators(segments, nothing), normalize).loss
        assert loss.item() == 0.0 and torch.isfinite(loss)


def test_a_bare_count_is_only_the_tokens_normalization():
    logits, ids, segments = _example()
    w = token_weights(segments, "l2t", 0.5, 2.0)
    vector = l2t_loss(logits, ids, segments, w, step_denominators(segments, w), "tokens").loss
    assert l2t_loss(logits, ids, segments, w, count_trained_tokens(w)).loss.item() == vector.item()
    with pytest.raises(ValueError, match="needs the step's"):
        l2t_loss(logits, ids, segments, w, 5, "per_part")
    with pytest.raises(ValueError, match="unknown normalization"):
        l2t_loss(logits, ids, segments, w, step_denominators(segments, w), "mean")


# ---------------------------------------------------------------- normalizations: exact across splits

# (data-parallel ranks, accumulation micro-batches per rank) over the 8 rows of `_batch`
LAYOUTS = [(1, 1), (1, 4), (1, 2), (2, 2), (2, 1), (4, 2)]


def _layout_step(model, ids, segments, normalize, ranks, accumulation, overrides=None, local=False):
    """One optimizer step as `ranks` model replicas x `accumulation` micro-batches each, as train_step does it.

    Denominators are summed over every micro-batch of every rank (the all-reduce; `local`: each micro-batch's
    own, the mistake); each replica backpropagates `loss * ranks` over its micro-batches and the step's
    gradient is the mean over replicas (DeepSpeed's data-parallel average).
    """
    chunks = list(zip(ids.chunk(ranks * accumulation), segments.chunk(ranks * accumulation)))
    weights = [token_weights(s, "l2t", 0.4, 1.6, overrides) for _, s in chunks]
    parts_of = [step_denominators(s, w) for (_, s), w in zip(chunks, weights)]
    per_rank = [sum(parts_of[r * accumulation : (r + 1) * accumulation]) for r in range(ranks)]
    everywhere = torch.stack(per_rank).sum(dim=0)  # what _all_reduce_sum hands every rank
    replicas = [copy.deepcopy(model) for _ in range(ranks)]
    loss = 0.0
    for index, ((i, s), w) in enumerate(zip(chunks, weights)):
        replica = replicas[index // accumulation]
        parts = l2t_loss(replica(i), i, s, w, parts_of[index] if local else everywhere, normalize)
        (parts.loss * ranks).backward()
        loss += parts.loss.item()
    grads = [torch.stack([p.grad for p in params]).mean(dim=0) for params in zip(*(r.parameters() for r in replicas))]
    return loss, grads


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_every_layout_takes_the_same_step(normalize):
    """Loss and every parameter's gradient: 1 rank x 4, 1 x 2 (micro x2), 2 ranks x 2, ... equal the unsplit step."""
    model = TinyLM()
    ids, segments = _batch()
    overrides = {"system": 0.25}  # a trained system token in part I, a weight not from λ
    want_loss, want_grads = _layout_step(model, ids, segments, normalize, 1, 1, overrides)
    for ranks, accumulation in LAYOUTS[1:]:
        loss, grads = _layout_step(model, ids, segments, normalize, ranks, accumulation, overrides)
        assert loss == pytest.approx(want_loss, rel=1e-6), (ranks, accumulation)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # The test can fail: each micro-batch normalized on its own is another objective.
    _, wrong = _layout_step(model, ids, segments, normalize, 2, 2, overrides, local=True)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(wrong, want_grads))


def test_the_normalizations_are_different_objectives():
    model = TinyLM()
    ids, segments = _batch()
    logits = model(ids).detach()
    w = token_weights(segments, "l2t", 0.4, 1.6)
    d = step_denominators(segments, w)
    nll = token_nll(logits, ids)
    target, weight = segments[:, 1:], w[:, 1:]
    is_i = torch.isin(target, torch.tensor([int(s) for s in (S.SYSTEM, S.ROLE, S.INSTRUCTION, S.TASK_TEMPLATE)]))
    is_a = torch.isin(target, torch.tensor([int(S.RESPONSE), int(S.END_OF_TURN)]))
    trained = weight > 0
    mean_i, mean_a = nll[trained & is_i].mean().item(), nll[trained & is_a].mean().item()
    got = {n: l2t_loss(logits, ids, segments, w, d, n).loss.item() for n in NORMALIZATIONS}
    assert got["tokens"] == pytest.approx((weight * nll).sum().item() / trained.sum().item(), rel=1e-6)
    assert got["weight"] == pytest.approx((weight * nll).sum().item() / weight.sum().item(), rel=1e-6)
    assert got["per_part"] == pytest.approx(0.4 * mean_i + 1.6 * mean_a, rel=1e-6)
    assert len({round(v, 4) for v in got.values()}) == 3
