"""Task-template statistics over the validated rows: which instruction sentences recur.

L2T masks the task templates (instruction sentences shared by many user
turns) as their own segment, so preparation must count, across the whole
data set, in how many user turns each sentence occurs. Validation already
split the turns into sentences; here the count runs as a distributed
groupby-sum, and only sentences frequent enough to be selected come back to
the driver, however large the data.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.config import ExperimentConfig


def sentence_counts(batch: pa.Table) -> pa.Table:
    """Ray Data stage: per block, in how many user turns each instruction sentence occurs.

    Validation already split the user turns into sentences
    (`task_templates.instruction_sentences`, one count per turn), so this is
    an Arrow value count: the map-side half of the aggregation.
    """
    flat = pc.list_flatten(batch.column("sentences"))
    if len(flat) == 0:
        return pa.table({"sentence": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    counts = pc.value_counts(flat)
    return pa.table({"sentence": counts.field("values"), "count": pc.cast(counts.field("counts"), pa.int64())})


def task_template_stats(rows, cfg: ExperimentConfig, total_turns: int, num_cpus: float, partitions: int = 1):
    """Distributed sentence count over all user turns (Ray Data groupby-sum), then the top-k / min-share selection.

    Only sentences that can be selected come back to the driver: those in at
    least `min_share` of the user turns (and at least 2), or, without a share
    limit, the most frequent ones.
    """
    from ray.data.expressions import col

    from workloads.task_templates import select_task_templates

    selection = cfg.masking.task_templates
    if total_turns == 0 or selection.top_k == 0:
        return select_task_templates({}, total_turns, top_k=selection.top_k, min_share=selection.min_share)
    totals = (
        rows.map_batches(sentence_counts, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus)
        .groupby("sentence", num_partitions=max(1, partitions))
        .sum("count")
    )
    floor = max(2, math.ceil((selection.min_share or 0.0) * total_turns))
    frequent = totals.filter(expr=col("sum(count)") >= floor)
    if selection.min_share is None and selection.top_k is not None:
        frequent = frequent.sort("sum(count)", descending=True).limit(max(selection.top_k * 4, selection.top_k + 16))
    counts = {r["sentence"]: int(r["sum(count)"]) for r in frequent.take_all()}
    return select_task_templates(counts, total_turns, top_k=selection.top_k, min_share=selection.min_share)
