"""`python -m orchestrator.cli ...`: the same commands as `l2t ...` (what a Ray Job's entrypoint runs)."""

from orchestrator.cli import app

app()
