"""What each masking mode trains of the synthetic worlds, with the tiny preset's tokenizer and the repo's own
task-template selection; and the quickstart configs use the scenes world with matching image sizes.

Run with ``-s`` to see the table (rows of both worlds, vicuna_v1, byte-level BPE of 2000 tokens):
per mode, trained tokens and their instruction / response shares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import load_config
from workloads.chat_templates import render
from workloads.conversations import parse_record
from workloads.segment_codes import Segment, token_shares
from workloads.segments import EncodeSpec, encode_conversations
from workloads.synthetic import SHORT_ANSWER_SENTENCE, YES_NO_SENTENCE, generate_records
from workloads.task_templates import count_sentences, select_task_templates
from workloads.tokenizer_factory import train_tokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ROWS = 3000
WORLDS = {
    # The old quickstart: one shape, four one-round kinds.
    "shapes": {"world": "shapes", "max_objects": 1, "kinds": ("color", "shape", "exists", "caption")},
    "scenes": {"world": "scenes", "max_objects": 3},
}


def _shares(world: str, top_k: int, min_share: float) -> tuple[dict, np.ndarray, tuple[str, ...]]:
    convs = [parse_record(r) for r in generate_records(ROWS, seed=0, **WORLDS[world])]
    tokenizer = train_tokenizer([render(c, "vicuna_v1").text for c in convs[:2000]], vocab_size=2000)
    counts, turns = count_sentences(convs)
    templates = select_task_templates(counts, turns, top_k=top_k, min_share=min_share).sentences()
    # (32 / 8)**2 + 1 image tokens, as the tiny preset at 32 px; no row is truncated at 2048.
    rows = encode_conversations(convs, tokenizer, EncodeSpec("vicuna_v1", 17, 2048, task_templates=templates))
    assert not [r for r in rows if isinstance(r, Exception)]
    segments = np.concatenate([r.segments for r in rows])
    by_segment = {s.name.lower(): int((segments == s).sum()) for s in Segment}
    return token_shares(by_segment), np.array([len(r.segments) for r in rows]), templates


@pytest.fixture(scope="module")
def measured() -> dict:
    return {(world, k, m): _shares(world, k, m) for world in WORLDS for k, m in ((20, 0.01), (10, 0.02))}


def test_response_tokens_are_a_substantial_share_of_what_l2t_trains(measured):
    for (world, top_k, min_share), (shares, lengths, templates) in measured.items():
        print(
            f"\n{world} (top_k {top_k}, min_share {min_share}): {len(templates)} task templates, "
            f"{lengths.mean():.0f} tokens per row (max {lengths.max()})"
        )
        for mode, share in shares.items():
            print(
                f"  {mode:14s} {share['trained']:7d} trained  instruction {share['instruction']:6.1%}  "
                f"response {share['response']:6.1%}"
            )
    for selection in ((20, 0.01), (10, 0.02)):
        scenes, _, templates = measured[("scenes", *selection)]
        shapes = measured[("shapes", *selection)][0]
        assert templates[:2] == (SHORT_ANSWER_SENTENCE, YES_NO_SENTENCE)
        # LLaVA-665K's long answers: responses are 35-55% of what l2t trains (roughly LLaVA-665K's share,
        # estimated in workloads/synthetic_scenes.py), and a fifth of what even l2t_full trains.
        assert 0.35 < scenes["l2t"]["response"] < 0.55
        assert 0.15 < scenes["l2t_full"]["response"] < 0.3
        assert scenes["l2t_full"]["response"] > 2 * shapes["l2t_full"]["response"]
        # What l2t adds to the response loss are the image-specific question words: about as many tokens again.
        assert scenes["l2t"]["trained"] > 1.8 * scenes["response"]["trained"]


def test_rows_fit_the_quickstart_length(measured):
    quickstart = load_config(CONFIGS / "quickstart.yaml")
    _, lengths, _ = measured[("scenes", 10, 0.02)]
    assert lengths.max() <= quickstart.data.max_length


@pytest.mark.parametrize("name", ["quickstart.yaml", "lambda_grid.yaml"])
def test_quickstart_configs_use_the_scenes_world(name):
    cfg = load_config(CONFIGS / name)
    synthetic = cfg.data.synthetic
    assert synthetic.world == "scenes" and synthetic.max_objects >= 2
    assert synthetic.image_size == cfg.model.tiny.image_size
    assert (cfg.model.tiny.image_size // cfg.model.tiny.patch_size) ** 2 <= 16  # few patches: a CPU quickstart
