"""Evaluation inputs: question files (with their scoring settings), the synthetic suite, encode settings.

`load_suite` turns a `--suite` (``synthetic`` or a question file) into normalized
questions, their image root and CHAIR vocabularies; `encode_spec_kwargs` decides
how questions are encoded (the training run's chat template, system prompt,
max length and task templates) so that evaluation prompts match training rows.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import storage

RULE_FIELDS = ("answer_rule", "choice_parser")
"""Scoring settings a question file may give per row (`rule` is read as `answer_rule`) or, in a JSON file
``{"questions": [...], "answer_rule": ..., "choice_parser": ...}``, for the whole suite."""


def _raw_rows(text: str, as_json: bool) -> tuple[list, dict]:
    """The file's rows as written (JSON lists flattened, as `parse_question_lines` reads them) and its
    suite-level scoring settings."""
    if as_json:
        value = json.loads(text)
        if isinstance(value, dict) and isinstance(value.get("questions"), list):
            return value["questions"], {k: value[k] for k in RULE_FIELDS if value.get(k)}
        return (value if isinstance(value, list) else [value]), {}
    rows: list = []
    for line in text.splitlines():
        if line.strip():
            value = json.loads(line)
            rows.extend(value if isinstance(value, list) else [value])
    return rows, {}


def load_question_file(path: str, *, limit: int | None = None, default_kind: str | None = None) -> list[dict]:
    """Normalized questions of a LLaVA-style JSONL (or JSON) file, local or s3://, each with the scoring
    settings (`RULE_FIELDS`) its row or the file gives."""
    from workloads.eval_questions import parse_question_lines

    text = storage.read_text(path)
    if path.endswith(".json"):
        raw, settings = _raw_rows(text, True)
        questions = parse_question_lines([json.dumps(raw)], limit=limit, default_kind=default_kind)
    else:
        questions = parse_question_lines(text.splitlines(), limit=limit, default_kind=default_kind)
        raw, settings = _raw_rows(text, False)  # every line parsed above, so this can't fail
    out = []
    for question, row in zip(questions, raw):
        row = row if isinstance(row, dict) else {}
        given = {**settings, **({"answer_rule": row["rule"]} if row.get("rule") else {})}
        given.update({k: row[k] for k in RULE_FIELDS if row.get(k)})
        out.append({**question, **given})
    return out


def encode_spec_kwargs(
    model_dir: str,
    *,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    max_length: int | None = None,
    task_templates: tuple[str, ...] | None = None,
    prepared: str | None = None,
    config=None,
) -> dict[str, Any]:
    """EncodeSpec arguments: explicit values first, then a prepared-data folder's manifest and
    task templates, then an experiment config, then vicuna_v1 / 2048 tokens. The image token count
    always comes from the model's config (a prepared folder that disagrees is refused)."""
    from transformers import AutoConfig

    from workloads.families import image_settings
    from workloads.task_templates import TaskTemplateList

    image = image_settings(AutoConfig.from_pretrained(model_dir))  # the family's image token and count (0: per image)
    image_tokens = image["num_image_tokens"]
    manifest: dict[str, Any] = {}
    if prepared:
        from orchestrator.prepare import PreparedData

        data = PreparedData.load(prepared)
        spec = data.encode_spec()
        if spec.num_image_tokens != image_tokens:
            raise ValueError(
                f"{prepared} was prepared with {spec.num_image_tokens} image tokens, the model uses {image_tokens}"
            )
        manifest = {"chat_template": spec.template, "max_length": spec.max_length}
        system_prompt = system_prompt if system_prompt is not None else spec.system_prompt
        if task_templates is None:
            task_templates = spec.task_templates
    if config is not None:
        chat_template = chat_template or manifest.get("chat_template") or config.data.chat_template
        system_prompt = system_prompt if system_prompt is not None else config.data.system_prompt
        max_length = max_length or manifest.get("max_length") or config.data.max_length
        if task_templates is None and config.masking.task_templates.file:
            task_templates = TaskTemplateList.load(config.masking.task_templates.file).sentences()
    return {
        "template": chat_template or manifest.get("chat_template") or "vicuna_v1",
        "num_image_tokens": image_tokens,
        "image_token": image["image_token"],
        "max_length": int(max_length or manifest.get("max_length") or 2048),
        "task_templates": tuple(task_templates or ()),
        "system_prompt": system_prompt,
    }


@dataclass
class SyntheticSuite:
    """The synthetic suite's settings; take them from the training set's `data.synthetic`."""

    rows: int = 200
    seed: int = 0
    max_objects: int = 1
    image_size: int = 32
    kinds: tuple[str, ...] | None = None
    world: str = "shapes"

    @classmethod
    def from_config(cls, config, rows: int | None = None) -> "SyntheticSuite":
        from workloads.synthetic import SINGLE_ROUND_KINDS

        synthetic = config.data.synthetic if config is not None else None
        if synthetic is None:
            return cls(rows=rows or 200)
        kinds = None  # the scenes world's suite is always its whole EVAL_KINDS
        if synthetic.world == "shapes":
            kinds = tuple(k for k in (synthetic.kinds or SINGLE_ROUND_KINDS) if k in SINGLE_ROUND_KINDS) or None
        return cls(
            rows=rows or synthetic.eval_rows or 200,
            seed=synthetic.seed,
            max_objects=synthetic.max_objects,
            image_size=synthetic.image_size,
            kinds=kinds,
            world=synthetic.world,
        )


def suite_name(suite: str) -> str:
    from workloads.eval_questions import SYNTHETIC_SUITE

    if suite == SYNTHETIC_SUITE:
        return suite
    return posixpath.basename(suite.rstrip("/")).rsplit(".", 1)[0] or "suite"


def load_suite(
    suite: str,
    out_dir: str,
    *,
    image_root: str | None = None,
    limit: int | None = None,
    default_kind: str | None = None,
    synthetic: SyntheticSuite | None = None,
) -> tuple[list[dict], str | None, dict[str, list[str]] | None]:
    """(normalized questions, image root, CHAIR vocabularies) of `synthetic` or a question file."""
    from workloads.eval_questions import SYNTHETIC_SUITE, synthetic_chair_vocabularies, synthetic_questions

    if suite == SYNTHETIC_SUITE:
        s = synthetic or SyntheticSuite()
        if storage.is_s3(out_dir):
            raise ValueError("the synthetic suite renders its images locally: give a local output folder")
        rows = min(s.rows, limit) if limit else s.rows
        questions, root = synthetic_questions(
            Path(out_dir) / "suite",
            rows=rows,
            seed=s.seed,
            max_objects=s.max_objects,
            image_size=s.image_size,
            kinds=s.kinds,
            world=s.world,
        )
        return questions, root, synthetic_chair_vocabularies()
    if not storage.exists(suite):
        raise FileNotFoundError(f"--suite: {suite} is neither 'synthetic' nor an existing question file")
    root = image_root or (posixpath.dirname(suite) if storage.is_s3(suite) else str(Path(suite).resolve().parent))
    return load_question_file(suite, limit=limit, default_kind=default_kind), root, None
