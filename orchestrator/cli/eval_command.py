"""`l2t eval`: evaluate a trained model on question suites (the work itself is `orchestrator.evaluate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError

from orchestrator.cli.common import console, fail
from orchestrator.config import ConfigError, EvalConfig, ExperimentConfig, load_config
from orchestrator.evaluate import SuiteResult, SyntheticSuite, options_from_config, run_eval, standalone_options

ModelDir = Annotated[
    str,
    typer.Argument(help="An exported model folder (l2t train writes <storage>/models/<run>/model) or a hub id."),
]
Suites = Annotated[
    Optional[list[str]],
    typer.Option(
        "--suite",
        help="`synthetic` (held-out synthetic scenes) or a LLaVA-style question file (JSONL/JSON, local or s3://: "
        "question_id, image, text, answer/answers/label, choices). Repeatable.",
    ),
]
Output = Annotated[Path, typer.Option(help="Folder for <suite>/samples.jsonl, samples.parquet, metrics.json.")]
ConfigFile = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        help="Experiment config: chat template, system prompt, max length, eval settings, "
        "and the synthetic suite (data.synthetic).",
    ),
]
Prepared = Annotated[
    Optional[str],
    typer.Option(help="Prepared-data folder of the training run: chat template, max length, task templates."),
]
ChatTemplate = Annotated[
    Optional[str],
    typer.Option(help="Chat template the model was trained with (vicuna_v1, llama3, qwen2, phi, plain, tokenizer)."),
]
ImageRoot = Annotated[
    Optional[str],
    typer.Option(
        help="Folder (or s3:// prefix) that image paths in question files are relative to; "
        "default: the folder of the question file."
    ),
]
MaxRows = Annotated[Optional[int], typer.Option(help="Evaluate at most this many questions per suite.")]
Kind = Annotated[Optional[str], typer.Option(help="Question kind for rows without one (e.g. pope, caption, vqa).")]
NullImage = Annotated[Optional[str], typer.Option(help="V=∅ for visual contribution: noise, blank or none.")]
Concurrency = Annotated[Optional[int], typer.Option(help="Model actors (default: one per GPU, or one per 4 CPUs).")]
SyntheticRows = Annotated[
    Optional[int],
    typer.Option(help="Questions in the synthetic suite (default: data.synthetic.eval_rows, else 200)."),
]
LmmsTasks = Annotated[
    Optional[list[str]],
    typer.Option(
        "--lmms-eval",
        help="lmms-eval tasks to run on the model too (TASK[,TASK], repeatable; needs pip install '.[lmms]'): "
        "one Ray task each, results in <output>/lmms_eval/<task>/ and an MLflow run.",
    ),
]
LmmsIncludePath = Annotated[
    Optional[str], typer.Option(help="A folder of extra lmms-eval task YAMLs (local tasks with local data).")
]
LmmsLimit = Annotated[Optional[int], typer.Option(help="At most this many documents per lmms-eval task.")]
AnswerRule = Annotated[
    Optional[str],
    typer.Option(help="Short-answer scoring: vqa, gqa, exact, or auto (the suite's published rule; default)."),
]
ChoiceParser = Annotated[
    Optional[str],
    typer.Option(help="Multiple-choice parsing: llava (LLaVA's letter parser), lenient, or auto (default)."),
]
Track = Annotated[
    Optional[bool],
    typer.Option("--track/--no-track", help="Log the results to an MLflow run (default: when lmms-eval ran)."),
]
EvalOverrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="Dotted overrides of --config, e.g. eval.null_image=blank", show_default=False),
]

FLAG_NAMES = {
    "use_gpu": "--gpu/--cpu",
    "lmms_eval_tasks": "--lmms-eval",
    "lmms_eval_include_path": "--lmms-include-path",
    "lmms_eval_limit": "--lmms-limit",
}
"""Eval settings whose flag is not `--` + the field name with dashes."""


def eval_command(
    model_dir: ModelDir,
    suite: Suites = None,
    output: Output = Path("l2t_eval"),
    config: ConfigFile = None,
    prepared: Prepared = None,
    chat_template: ChatTemplate = None,
    image_root: ImageRoot = None,
    max_rows: MaxRows = None,
    kind: Kind = None,
    null_image: NullImage = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Generation budget per answer.")] = None,
    num_beams: Annotated[Optional[int], typer.Option(help="Beam search width (1: greedy).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Questions per actor batch.")] = None,
    concurrency: Concurrency = None,
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--cpu", help="One GPU per actor.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the noise images.")] = None,
    synthetic_rows: SyntheticRows = None,
    lmms_eval: LmmsTasks = None,
    lmms_include_path: LmmsIncludePath = None,
    lmms_limit: LmmsLimit = None,
    answer_rule: AnswerRule = None,
    choice_parser: ChoiceParser = None,
    track: Track = None,
    overrides: EvalOverrides = None,
) -> None:
    """Evaluate a trained model: batch inference on Ray Data, accuracy, VC, POPE, CIDEr/BLEU-4, CHAIR; and
    lmms-eval's tasks with `--lmms-eval`."""
    from orchestrator.experiment import model_experiment
    from orchestrator.lmms_eval import LmmsEvalUnavailable, parse_tasks
    from workloads.eval_questions import QuestionError

    flags = {"null_image": null_image, "max_new_tokens": max_new_tokens, "num_beams": num_beams}
    flags |= {"batch_size": batch_size, "concurrency": concurrency, "use_gpu": gpu, "seed": seed}
    flags |= {"answer_rule": answer_rule, "choice_parser": choice_parser}
    flags |= {"lmms_eval_tasks": parse_tasks(lmms_eval) or None, "lmms_eval_include_path": lmms_include_path}
    flags |= {"lmms_eval_limit": lmms_limit}
    try:
        cfg = experiment_config(config, overrides) or model_experiment(model_dir)
        options = resolve_options(cfg, **flags)
        trained_on = cfg.data.eval_file if cfg is not None and cfg.data.eval_file else "synthetic"
        results = run_eval(
            model_dir,
            suite or ([] if options.lmms_eval_tasks else [trained_on]),
            str(output),
            options=options,
            image_root=image_root,
            max_rows=max_rows,
            kind=kind,
            prepared=prepared,
            config=cfg,
            chat_template=chat_template,
            synthetic=SyntheticSuite.from_config(cfg, synthetic_rows),
            track=track,
        )
    except (ConfigError, QuestionError, FileNotFoundError, ValueError, LmmsEvalUnavailable) as error:
        fail(str(error))
    console.print(metrics_table(results))
    for name, result in results.items():
        console.print(f"{name}: {result.samples_jsonl}  {result.samples_parquet}")


def experiment_config(config: Path | None, overrides: list[str] | None) -> ExperimentConfig | None:
    """The `--config` experiment with its dotted overrides; None without `--config` (then overrides are refused)."""
    if config is None:
        if overrides:
            raise ConfigError("dotted overrides need --config")
        return None
    return load_config(config, overrides or [])


def resolve_options(cfg: ExperimentConfig | None = None, **flags: Any) -> EvalConfig:
    """The eval settings: each flag that is not None, over the config's `eval` section (else over the
    defaults of a config-less `l2t eval`), validated like a config so a bad flag is named."""
    base = options_from_config(cfg) if cfg is not None else standalone_options()
    given = {name: value for name, value in flags.items() if value is not None}
    try:
        return EvalConfig.model_validate({**base.model_dump(), **given})
    except ValidationError as error:
        raise ConfigError("; ".join(_flag_error(item) for item in error.errors())) from None


def _flag_error(item: dict) -> str:
    """One pydantic error as `--flag: what is wrong, got value`."""
    name = str(item["loc"][0]) if item["loc"] else "eval"
    flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
    return f"{flag}: {item['msg']}, got {item['input']!r}"


def metrics_table(results: dict[str, SuiteResult]):
    """The headline metrics of each suite side by side (a rich Table)."""
    from rich.table import Table

    shown = (
        ("questions", "eval_samples", "{:.0f}"),
        ("accuracy", "accuracy", "{:.1%}"),
        ("exact match", "exact_match", "{:.1%}"),
        ("VC / token", "vc_mean", "{:+.3f}"),
        ("VC / sample", "vc_sum", "{:+.3f}"),
        ("VC > 0", "vc_positive_share", "{:.1%}"),
        ("POPE F1", "pope_f1", "{:.3f}"),
        ("POPE yes ratio", "pope_yes_ratio", "{:.1%}"),
        ("caption CIDEr-D", "caption_cider", "{:.3f}"),
        ("caption BLEU-4", "caption_bleu4", "{:.3f}"),
        ("CHAIR_i", "chair_i", "{:.1%}"),
        ("CHAIR_s", "chair_s", "{:.1%}"),
        ("CHAIR_i COCO", "chair_coco_i", "{:.1%}"),
        ("CHAIR_s COCO", "chair_coco_s", "{:.1%}"),
    )
    table = Table(title="evaluation")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    kinds = sorted({k for r in results.values() for k in r.metrics if k.startswith("accuracy_")})
    lmms = sorted({k for name, r in results.items() if name.startswith("lmms:") for k in r.metrics})
    rows = list(shown) + [(f"  {k}", k, "{:.1%}") for k in kinds] + [(f"lmms {k}", k, "{:.4g}") for k in lmms]
    for label, key, fmt in rows:
        values = [r.metrics.get(key) for r in results.values()]
        if any(v is not None for v in values):
            table.add_row(label, *("-" if v is None else fmt.format(v) for v in values))
    return table
