"""Loading experiments: YAML files, dotted `key=value` overrides, errors that name the key.

The schema itself (one pydantic model per section) is `workloads.config`,
importable by Ray workers without the orchestrator; this module reads files
into it and re-exports its classes for the control plane.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from workloads.config import (  # noqa: F401 - re-exported for the control plane
    AshaConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    MaskingConfig,
    ModelConfig,
    StorageConfig,
    SweepConfig,
    SyntheticConfig,
    TaskTemplateConfig,
    TinyModelConfig,
    TrackingConfig,
    TrainConfig,
    flatten,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A config that can't be used; the message names the offending key."""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return raw


def with_overrides(cfg: ExperimentConfig, updates: dict[str, Any]) -> ExperimentConfig:
    """A copy of `cfg` with `{dotted.key: value}` set, validated again."""
    raw = cfg.model_dump(mode="json")
    for key, value in updates.items():
        apply_overrides(raw, [f"{key}={json.dumps(value)}"])
    return config_from_dict(raw, "<overrides>")


def _known_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """Field names allowed at `path` (used for 'did you mean' hints)."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
            close = difflib.get_close_matches(str(loc[-1]), _known_keys(ExperimentConfig, loc[:-1]), n=1)
            if close:
                message += f" (did you mean {'.'.join(str(p) for p in loc[:-1] + (close[0],))}?)"
        lines.append(f"  {dotted}: {message}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment, apply dotted overrides, validate."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(apply_overrides(raw, overrides or []), str(path))


def json_schema() -> dict[str, Any]:
    return ExperimentConfig.model_json_schema()


def resolve_repo_path(value: str) -> Path:
    """A path from a config: as given if it exists, else relative to the repository root."""
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute():
        return path
    return REPO_ROOT / path
