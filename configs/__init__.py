"""The experiment configs and DeepSpeed JSONs, installed as the package `l2t_configs` (see pyproject.toml), so an
installed l2t finds `configs/quickstart.yaml` and `configs/deepspeed/*.json` without the checkout."""
