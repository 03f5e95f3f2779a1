"""Logits processors that requests may name (``logits_processors`` in a request).

A plugin registers a :class:`~patchbay.registry.LogitsProcessorSpec` whose
``factory(*args, **kwargs)`` builds one processor instance per sequence from
the request's ``args`` / ``kwargs``. Each engine step, the engine groups the
rows of all sequences whose processors share a class and calls that class's
:meth:`LogitsProcessor.apply_batch` once, with each sequence's tokens so far.
Processors edit the logits in place (masking with ``-inf``, adding biases).

Only registered qualnames are accepted; nothing is imported because a
request named it.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch


class LogitsProcessor:
    """Base class: override :meth:`apply` (one row) or :meth:`apply_batch` (all rows at once)."""

    def apply(self, output_ids: Sequence[int], prompt_ids: Sequence[int], logits: torch.Tensor) -> None:
        """Edit ``logits`` ``[V]`` (float32) of one sequence in place."""
        raise NotImplementedError

    @classmethod
    def apply_batch(
        cls,
        instances: Sequence["LogitsProcessor"],
        output_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]],
        logits: torch.Tensor,
    ) -> None:
        """Edit ``logits`` ``[n, V]`` in place; row ``i`` belongs to ``instances[i]``."""
        for i, inst in enumerate(instances):
            inst.apply(output_ids[i], prompt_ids[i], logits[i])


def build_processor(factory: Any, args: Sequence[Any], kwargs: dict[str, Any], context: dict[str, Any]) -> LogitsProcessor:
    """Instantiate; ``context`` (``tokenizer``, ``eos_token_ids``, ``vocab_size``, ``extra_args``) is
    passed as the keyword ``context`` to factories whose signature has it."""
    try:
        accepts = "context" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts = False
    return factory(*args, **kwargs, context=context) if accepts else factory(*args, **kwargs)
