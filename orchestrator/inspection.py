"""What `l2t data inspect` shows masks with: the encoding and task templates that training uses.

An inspector that picked task templates from the few rows it shows would call
nearly every sentence a template and show masks that training never uses.
So the spec comes, in this order, from the prepared data of the same config
(exactly what was trained on), else from the configured template file, else
from sentence statistics over the config's own sources, as preparation
computes them; `origin` says which.
"""

from __future__ import annotations

import json

from orchestrator import layout, storage
from orchestrator.config import ExperimentConfig
from orchestrator.prepare import PreparedData, preparation_key
from orchestrator.readers import list_source_files, local_records


def training_encode_spec(cfg: ExperimentConfig, model_dir: str):
    """(EncodeSpec, origin): how training encodes rows of `cfg` with the tokenizer of `model_dir`."""
    from transformers import AutoConfig

    from workloads.families import image_settings
    from workloads.segments import EncodeSpec
    from workloads.task_templates import TaskTemplateList

    files = list_source_files(cfg.data.sources)
    prepared = layout.prepared_dir(cfg.storage.path, preparation_key(cfg, files, model_dir))
    if storage.exists(storage.join(prepared, "manifest.json")):
        return PreparedData.load(prepared).encode_spec(), f"the prepared data {prepared}"
    selection = cfg.masking.task_templates
    if selection.file:
        templates, origin = (
            TaskTemplateList.load(selection.file).sentences(),
            f"masking.task_templates.file {selection.file}",
        )
    else:
        templates, turns = _source_statistics(cfg, files)
        origin = f"sentence statistics over {turns:,} user turns of data.sources"
    spec = EncodeSpec(
        template=cfg.data.chat_template,
        **image_settings(AutoConfig.from_pretrained(model_dir)),  # the family's image token and count
        max_length=cfg.data.max_length,
        task_templates=templates,
        system_prompt=cfg.data.system_prompt,
        image_placement=cfg.data.image_placement,
    )
    return spec, origin


def _source_statistics(cfg: ExperimentConfig, files: list[str]) -> tuple[tuple[str, ...], int]:
    """Task templates selected as preparation selects them, over every good record of the sources."""
    from workloads.conversations import ConversationError, parse_record
    from workloads.task_templates import count_sentences, select_task_templates

    def conversations():
        for _, _, raw in local_records(files):
            try:
                yield parse_record(json.loads(raw), cfg.data.format)
            except (ValueError, ConversationError):
                continue

    counts, turns = count_sentences(conversations())
    selection = cfg.masking.task_templates
    chosen = select_task_templates(counts, turns, top_k=selection.top_k, min_share=selection.min_share)
    return chosen.sentences(), turns
