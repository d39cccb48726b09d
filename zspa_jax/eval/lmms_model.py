"""`--model zspa_jax`: the lmms-eval model class (a thin adapter over `zspa_jax.eval.runner`).

    lmms-eval --model zspa_jax --model_args pretrained=DIR,keep=64,method=zspaprune --tasks pope

Registered through the `lmms_eval.models` entry point (`zspa_jax.eval.plugin`). A "simple"
lmms-eval model: tasks give it prompt text and a `doc_to_visual` for the images. The model
arguments are checked in the constructor, which lmms-eval runs before it loads any task.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from zspa_jax.eval.args import parse_model_args
from zspa_jax.eval.runner import GenRequest, LoglikelihoodRequest, Runner


class ZSPAJax(lmms):
    """zspa_jax (JAX / Flax NNX, optional visual-token pruning) as an lmms-eval model."""

    is_simple = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.args = parse_model_args(kwargs)  # every argument error before the model loads
        self.runner = Runner(self.args)
        self.batch_size_per_gpu = self.args.batch_size
        self.chat_template = None

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> ZSPAJax:
        """Like lmms' own, except that `batch_size` in `--model_args` wins over `--batch_size`
        (lmms-eval always passes the latter, default 1)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {
            k: v for k, v in (additional_config or {}).items() if v is not None and k not in args
        }
        return cls(**args, **extra)

    # ------------------------------------------------------------------ helpers

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _images(self, doc_to_visual, task: str, split: str, doc_id: int) -> tuple:
        if doc_to_visual is None:
            return ()
        visuals = doc_to_visual(self._doc(task, split, doc_id))
        if visuals is None:
            return ()
        visuals = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        flat = [
            v for item in visuals for v in (item if isinstance(item, (list, tuple)) else [item])
        ]
        return tuple(flat)

    # ------------------------------------------------------------------ lmms API

    def generate_until(self, requests: list[Instance]) -> list[str]:
        reqs = []
        for inst in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = inst.args
            reqs.append(
                GenRequest(
                    context,
                    self._images(doc_to_visual, task, split, doc_id),
                    dict(gen_kwargs or {}),
                )
            )
        return self.runner.generate_until(reqs)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        reqs = []
        for inst in requests:
            if len(inst.args) == 2:  # ("", choice): unconditional scoring, no image
                context, continuation = inst.args
                reqs.append(LoglikelihoodRequest(context, continuation))
                continue
            context, target, doc_to_visual, doc_id, task, split = inst.args
            continuation = (
                target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            )
            if isinstance(continuation, (list, tuple)):
                continuation = continuation[0]
            reqs.append(
                LoglikelihoodRequest(
                    context, str(continuation), self._images(doc_to_visual, task, split, doc_id)
                )
            )
        return self.runner.loglikelihood(reqs)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Rounds until the task's `doc_to_text` signals the end; one list of answers per request."""
        results = []
        for inst in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = inst.args
            doc = self._doc(task, split, doc_id)
            images, outputs, info, round_idx = (
                self._images(doc_to_visual, task, split, doc_id),
                [],
                None,
                0,
            )
            while True:
                if round_idx:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc,
                        previous_output=list(outputs),
                        round_idx=round_idx,
                        previous_round_info=info,
                    )
                    outputs = list(outputs)
                    if terminal:
                        break
                    if visuals is not None:
                        images = (
                            tuple(visuals) if isinstance(visuals, (list, tuple)) else (visuals,)
                        )
                outputs.append(
                    self.runner.generate_until(
                        [GenRequest(context, images, dict(gen_kwargs or {}))]
                    )[0]
                )
                round_idx += 1
            results.append(outputs)
        return results
