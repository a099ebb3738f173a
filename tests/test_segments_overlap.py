"""`encode_conversations` gives the same rows with and without its tokenizer thread, in any chunking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def test_the_tokenizer_thread_changes_no_row(synthetic_data, tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    from workloads.conversations import parse_record
    from workloads.model import num_image_tokens
    from workloads.segments import EncodeSpec, encode_conversations

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = EncodeSpec("vicuna_v1", num_image_tokens(AutoConfig.from_pretrained(tiny_model_dir)), 64)
    lines = Path(synthetic_data.train_file).read_text().splitlines()[:200]
    convs = [parse_record(json.loads(line)) for line in lines]
    reference = encode_conversations(convs, tokenizer, spec, chunk_rows=len(convs))
    for chunk_rows, overlap in ((7, True), (7, False), (64, None)):
        rows = encode_conversations(convs, tokenizer, spec, chunk_rows=chunk_rows, overlap=overlap)
        assert len(rows) == len(reference)
        for row, expected in zip(rows, reference):
            assert type(row) is type(expected)
            if hasattr(expected, "segments"):
                np.testing.assert_array_equal(row.input_ids, expected.input_ids)
                np.testing.assert_array_equal(row.segments, expected.segments)
                assert (row.truncated, row.images_kept) == (expected.truncated, expected.images_kept)
