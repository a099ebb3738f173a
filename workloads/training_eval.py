"""Held-out evaluation during training, so that early stopping ranks trials by what the study measures.

ASHA (orchestrator/sweep.py) compares trials at rungs: optimizer steps
grace_period x reduction_factor^k. Ranked by a training loss, it keeps the
trials that fit their own tokens best, which is not what a λ study asks: with
`sweep.asha.metric: eval/<metric>` (any metric `eval_summary.summarize`
reports: accuracy, vc_mean, pope_f1, caption_cider, ...) each trial answers a
small fixed set of held-out questions at exactly the rung steps, on the live
model (eval mode, then back to training mode), through the same `Evaluator`
the evaluation after training uses, with the same encoding as the training
rows. Every trial of a sweep answers the same questions, so a rung compares
like with like.

Rank 0 evaluates alone while the other ranks wait at the next step's
collective, so the parameters must be whole on rank 0: the sweep refuses
ZeRO-3. Every report carries the latest value (NaN before the first rung):
Tune's strict metric checking wants the metric in every result, while ASHA
reads it only at the first report at or past each rung, which is the rung
step itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

EVAL_PREFIX = "eval/"


@dataclass
class TrainingEval:
    """A held-out check at fixed optimizer steps; `__call__` scores the model and returns `{metric: value}`."""

    metric: str
    """The reported key, `eval/<summary metric>`."""
    steps: list[int]
    """Optimizer steps (1-based, after the step) at which to evaluate."""
    questions: list[dict]
    """Normalized questions with their scoring rules (`orchestrator.evaluate.score_questions`)."""
    spec_kwargs: dict[str, Any]
    """`EncodeSpec` fields of the prepared data (the training rows' encoding)."""
    image_root: str | None = None
    null_image: str = "noise"
    max_new_tokens: int = 8
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        self._parts: tuple | None = None  # (tokenizer, image processor), loaded at the first evaluation
        self.open_image = None  # path -> PIL image; None: local files under image_root
        if not self.metric.startswith(EVAL_PREFIX):
            raise ValueError(f"a held-out metric is named {EVAL_PREFIX}<metric>, got {self.metric!r}")
        self.steps = sorted(int(s) for s in self.steps)

    def to_config(self) -> dict[str, Any]:
        """Plain data to ship to a worker (`from_config` rebuilds it)."""
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any] | None, open_image=None) -> "TrainingEval | None":
        """`to_config`'s data back as a check (None stays None); `open_image(path)` reads its images."""
        if not config:
            return None
        check = cls(**config)
        check.open_image = open_image
        return check

    def initial(self) -> dict[str, float]:
        """What reports carry before the first evaluation."""
        return {self.metric: math.nan}

    def due(self, step: int) -> bool:
        return step in self.steps

    def __call__(self, model, model_dir: str) -> dict[str, float]:
        """Answer the questions with `model` (processor files from `model_dir`); `{metric: value}`."""
        from workloads.eval_summary import summarize
        from workloads.evaluator import Evaluator
        from workloads.segments import EncodeSpec

        tokenizer, image_processor = self._processor(model_dir)
        was_training = model.training
        try:
            evaluator = Evaluator(
                model,
                tokenizer,
                image_processor,
                EncodeSpec(**self.spec_kwargs),
                image_root=self.image_root,
                open_image=self.open_image,
                null_image=self.null_image,
                max_new_tokens=self.max_new_tokens,
                seed=self.seed,
            )
            samples = []
            for start in range(0, len(self.questions), self.batch_size):
                samples.extend(evaluator(self.questions[start : start + self.batch_size]))
        finally:
            model.train(was_training)
        summary = summarize(samples)
        key = self.metric[len(EVAL_PREFIX) :]
        if key not in summary:
            raise ValueError(
                f"sweep.asha.metric={self.metric!r}: the held-out evaluation reports "
                f"{', '.join(EVAL_PREFIX + k for k in sorted(summary))}"
            )
        return {self.metric: float(summary[key])}

    def _processor(self, model_dir: str):
        if self._parts is None:
            from transformers import AutoImageProcessor, AutoTokenizer

            self._parts = (AutoTokenizer.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir))
        return self._parts
