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
    ModelConfig,
    StorageConfig,
    SweepConfig,
    SyntheticConfig,
    TinyModelConfig,
    TrackingConfig,
    TrainConfig,
    flatten,
)
from workloads.masking_config import MaskingConfig, TaskTemplateConfig  # noqa: F401 - re-exported

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout this module is in; installed from a wheel, the folder holding the packages (no configs/ there)."""


def _config_dir() -> Path:
    """configs/ of the checkout, else the copy shipped in the wheel as the package `l2t_configs`."""
    if (REPO_ROOT / "configs").is_dir():
        return REPO_ROOT / "configs"
    import importlib.util

    spec = importlib.util.find_spec("l2t_configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return REPO_ROOT / "configs"


CONFIG_DIR = _config_dir()
"""The experiment YAMLs and DeepSpeed JSONs (`configs/` in the repository, `l2t_configs` when installed)."""


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
    """Read a YAML experiment, apply dotted overrides, validate.

    A relative `train.deepspeed` that is neither under the working folder nor under the repository or the
    packaged configs is taken relative to the config file's folder (and written into the config as absolute)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    cfg = config_from_dict(apply_overrides(raw, overrides or []), str(path))
    deepspeed = cfg.train.deepspeed
    if deepspeed and not resolve_repo_path(deepspeed).exists() and (path.parent / deepspeed).exists():
        cfg = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"deepspeed": str((path.parent / deepspeed).resolve())})}
        )
    return sources_over_synthetic(cfg)


def sources_over_synthetic(cfg: ExperimentConfig) -> ExperimentConfig:
    """Explicit `data.sources` win over `data.synthetic` (e.g. `configs/quickstart.yaml data.sources=[my.json]`):
    the synthetic set is dropped and one line on stderr says so."""
    if not (cfg.data.sources and cfg.data.synthetic is not None):
        return cfg
    import sys

    print("note: data.sources is set, so data.synthetic is ignored", file=sys.stderr, flush=True)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"synthetic": None})})


def json_schema() -> dict[str, Any]:
    return ExperimentConfig.model_json_schema()


def resolve_repo_path(value: str) -> Path:
    """A path from a config: as given if it exists, else relative to the repository root, else to the configs
    folder (packaged in a wheel: `configs/deepspeed/zero2.json` is found there as `deepspeed/zero2.json`)."""
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute():
        return path
    candidates = [REPO_ROOT / path, CONFIG_DIR / path]
    if path.parts and path.parts[0] == "configs":
        candidates.append(CONFIG_DIR.joinpath(*path.parts[1:]))
    return next((c for c in candidates if c.exists()), candidates[0])
