"""lmms-eval as an evaluation backend: its tasks, data and metrics; l2t's prompts, model and Ray.

`l2t eval MODEL --lmms-eval TASK[,TASK]` (and `eval.lmms_eval_tasks` after
training or in each sweep trial) runs lmms-eval's ``simple_evaluate`` on the
trained model, one Ray task per lmms-eval task (one GPU each, or a fraction of a
CPU for tiny models). The model is `L2TLmms`, an lmms-eval model adapter built
on `workloads.evaluator.Evaluator`: every request is rendered with the chat
template, system prompt and image placement the model was trained with (the
same `EncodeSpec` as l2t's own suites), so scores are comparable with them.
Only generation requests are served (``generate_until``, the output type of
lmms-eval's image QA and captioning tasks); log-likelihood tasks are refused.

Outputs go beside l2t's suites: ``<output>/lmms_eval/<task>/results.json``
(lmms-eval's results, configs and versions) and ``samples.jsonl`` (one line per
document: its prompt, the prediction, the per-document metrics). Metrics come
back flattened as ``lmms/<task>/<metric>`` (lmms-eval's ``,none`` filter suffix
dropped, other filters kept as ``<metric>_<filter>``), which MLflow takes as
metric names.

lmms-eval is an optional extra (``pip install .[lmms]``); without it these
entry points raise `LmmsEvalUnavailable` with the install hint. lmms-eval's own
tasks download their data from the Hugging Face Hub; local tasks (YAMLs in
``include_path`` with local data files, e.g. ``dataset_path: json`` with
``data_files`` beside the YAML) run offline, with ``HF_HUB_OFFLINE=1`` and
``HF_DATASETS_OFFLINE=1`` set for the driver, which passes them on (`HF_ENV`).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from orchestrator import storage
from orchestrator.config import EvalConfig

LMMS_DIR = "lmms_eval"
HF_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_DATASETS_CACHE", "HF_TOKEN", "HF_ENDPOINT")
"""Hugging Face settings the driver passes on to the task workers (e.g. `HF_HUB_OFFLINE=1` on a machine
without network, where tasks read local files only)."""
INSTALL_HINT = "lmms-eval is not installed: pip install 'l2t-orchestrator[lmms]' (or pip install lmms-eval)"


class LmmsEvalUnavailable(RuntimeError):
    """lmms-eval (the optional `lmms` extra) can't be imported here."""


def require_lmms_eval() -> None:
    """Raise `LmmsEvalUnavailable` (with the install hint and the import error) unless lmms-eval imports."""
    try:
        import lmms_eval.evaluator  # noqa: F401
    except Exception as error:  # ImportError, or a broken dependency of lmms-eval at import time
        raise LmmsEvalUnavailable(f"{INSTALL_HINT} ({type(error).__name__}: {error})") from error


def parse_tasks(values: list[str] | str | None) -> list[str]:
    """Task names from `--lmms-eval a,b --lmms-eval c` (comma-separated, repeatable), in order, once each."""
    items = [values] if isinstance(values, str) else list(values or [])
    names = [name.strip() for item in items for name in str(item).split(",")]
    return list(dict.fromkeys(name for name in names if name))


def flatten_results(task: str, results: dict[str, Any]) -> dict[str, float]:
    """``lmms/<task>/<metric>`` -> value for the numeric results of one task (and its subtasks, as
    ``lmms/<subtask>/<metric>``); stderr entries and non-numbers are left out, ``,none`` is dropped."""
    out: dict[str, float] = {}
    for name, values in (results.get("results") or {}).items():
        for key, value in values.items():
            if key == "alias" or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            metric, _, filt = key.partition(",")
            metric = metric if filt in ("", "none") else f"{metric}_{filt}"
            out[f"lmms/{_metric_name(name)}/{_metric_name(metric)}"] = float(value)
    if not out and task:
        raise ValueError(f"lmms-eval returned no numeric metric for {task!r}")
    return out


def _metric_name(text: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . space /)."""
    return re.sub(r"[^\w\-. ]", "_", str(text))


def make_adapter(model_dir: str, spec_kwargs: dict[str, Any], options: EvalConfig, device: str):
    """An lmms-eval model (`lmms` subclass) answering with l2t's `Evaluator`; imports lmms-eval."""
    require_lmms_eval()
    from lmms_eval.api.model import lmms

    from workloads.eval_questions import normalize_question
    from workloads.evaluator import Evaluator
    from workloads.segments import EncodeSpec

    class L2TLmms(lmms):
        """lmms-eval model adapter: requests become l2t questions, answered as l2t's suites are."""

        def __init__(self) -> None:
            super().__init__()
            self.images: dict[str, Any] = {}
            self.evaluator = Evaluator.from_pretrained(
                model_dir,
                EncodeSpec(**spec_kwargs),
                device=device,
                open_image=self.images.__getitem__,
                null_image=options.null_image,
                max_new_tokens=options.max_new_tokens,
                num_beams=options.num_beams,
                seed=options.seed,
            )

        def generate_until(self, requests) -> list[str]:
            out: list[str] = []
            for start in range(0, len(requests), options.batch_size):
                out.extend(self._answer([r.args for r in requests[start : start + options.batch_size]]))
            return out

        def _answer(self, batch: list[tuple]) -> list[str]:
            rows, stops, budgets = [], [], []
            self.images.clear()
            for context, gen_kwargs, doc_to_visual, doc_id, task, split in batch:
                visuals = [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]
                key = f"{task}/{split}/{doc_id}"
                paths = [f"{key}#{k}" for k in range(len(visuals))]
                self.images.update({path: visual.convert("RGB") for path, visual in zip(paths, visuals)})
                text = str(context).replace("<image>", "").strip() or "Describe the image."
                rows.append(normalize_question({"question_id": key, "image": paths, "text": text}))
                until = gen_kwargs.get("until") or []
                stops.append([until] if isinstance(until, str) else list(until))
                budgets.append(int(gen_kwargs.get("max_new_tokens") or options.max_new_tokens))
            self.evaluator.max_new_tokens = max(budgets)
            answers = []
            for sample, until in zip(self.evaluator(rows), stops):
                text = sample.prediction or ""
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                answers.append(text)
            return answers

        def loglikelihood(self, requests):
            raise NotImplementedError("l2t's lmms-eval adapter serves generate_until tasks only")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("l2t's lmms-eval adapter serves single-round generate_until tasks only")

    return L2TLmms()


def evaluate_task(
    model_dir: str,
    task: str,
    spec_kwargs: dict[str, Any],
    options: dict[str, Any],
    out_dir: str,
    include_path: str | None = None,
    limit: int | None = None,
) -> dict[str, float]:
    """Run one lmms-eval task in this process; write ``results.json`` and ``samples.jsonl`` under `out_dir`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    opts = EvalConfig.model_validate(options)
    require_lmms_eval()
    import torch
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import handle_non_serializable

    if opts.torch_threads and not opts.use_gpu:
        torch.set_num_threads(opts.torch_threads)
    _skip_filelock_patch()
    adapter = make_adapter(model_dir, spec_kwargs, opts, "cuda" if opts.use_gpu else "cpu")
    results = simple_evaluate(
        model=adapter,
        tasks=[task],
        limit=limit,
        task_manager=TaskManager(include_path=include_path) if include_path else None,
        log_samples=True,
        bootstrap_iters=0,
        batch_size=opts.batch_size,
    )
    if results is None:
        raise RuntimeError(f"lmms-eval returned nothing for {task!r}")
    samples = results.pop("samples", {}) or {}
    metrics = flatten_results(task, results)
    storage.write_text(
        storage.join(out_dir, "results.json"),
        json.dumps({**results, "l2t_metrics": metrics}, indent=2, sort_keys=True, default=handle_non_serializable),
    )
    lines = [
        json.dumps(_sample_line(name, sample), sort_keys=True, default=handle_non_serializable)
        for name, task_samples in samples.items()
        for sample in task_samples
    ]
    storage.write_text(storage.join(out_dir, "samples.jsonl"), "".join(line + "\n" for line in lines))
    return metrics


def _skip_filelock_patch() -> None:
    """lmms-eval 0.7 patches ``filelock._api`` (gone in filelock 4) against a deadlock between ranks that
    load datasets at once; one process per task has no such ranks, so the patch is skipped there."""
    import filelock
    import lmms_eval.evaluator

    if not hasattr(filelock, "_api"):
        lmms_eval.evaluator._enable_reentrant_filelocks._patched = True


def _sample_line(task: str, sample: dict) -> dict:
    """One document's record: the document (images left out by lmms-eval), prompt, target, prediction
    and per-document metrics."""
    args = sample.get("arguments") or []
    responses = sample.get("filtered_resps") or sample.get("resps") or []
    extra = {k: v for k, v in sample.items() if k not in ("arguments", "resps", "filtered_resps")}
    return {
        "task": task,
        "prompt": args[0] if args and isinstance(args[0], str) else None,
        "prediction": responses[0] if responses else None,
        **extra,
    }


def run_lmms_eval(
    model_dir: str,
    tasks: list[str],
    output: str,
    spec_kwargs: dict[str, Any],
    options: EvalConfig,
    *,
    include_path: str | None = None,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """Every lmms-eval task as one Ray task (one GPU each with `use_gpu`, else `cpus_per_actor` CPUs, 0.5
    by default), in parallel; ``{task: metrics}``, written to ``<output>/lmms_eval/<task>/`` and summed up in
    ``<output>/lmms_eval/metrics.json``."""
    import ray

    require_lmms_eval()
    if not tasks:
        return {}
    include_path = storage.absolute(include_path) if include_path else None
    resources = {"num_gpus": 1} if options.use_gpu else {"num_cpus": options.cpus_per_actor or 0.5}
    threads = options.torch_threads or max(1, round(resources.get("num_cpus", 1)))
    opts = options.model_copy(update={"torch_threads": threads}).model_dump()
    env = {key: os.environ[key] for key in HF_ENV if key in os.environ}
    remote = ray.remote(max_retries=0, runtime_env={"env_vars": env} if env else None, **resources)(evaluate_task)
    refs = {
        task: remote.remote(str(model_dir), task, spec_kwargs, opts, task_dir(output, task), include_path, limit)
        for task in tasks
    }
    results = {task: ray.get(ref) for task, ref in refs.items()}
    storage.write_text(
        storage.join(storage.absolute(output), LMMS_DIR, "metrics.json"), json.dumps(results, indent=2, sort_keys=True)
    )
    return results


def task_dir(output: str, task: str) -> str:
    """Where one lmms-eval task's results go: ``<output>/lmms_eval/<task>``."""
    return storage.join(storage.absolute(output), LMMS_DIR, _metric_name(task))


def merged_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The metrics of every task in one flat dict (their names already carry the task)."""
    return {name: value for metrics in results.values() for name, value in metrics.items()}
