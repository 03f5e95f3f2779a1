"""The "transformers" model family: transformers' own modelling code for architectures no native family runs.

Like vLLM's Transformers backend (``--model-impl transformers``): any
``AutoModelForCausalLM`` architecture transformers knows is loaded with its own
modelling code and served on the shared scheduler over patchbay's paged KV
cache — continuous batching, prefix caching, chunked prefill — with attention
routed through transformers' ``AttentionInterface`` to patchbay's paged kernel
(:mod:`.attention`, :mod:`.causal`); every layer's sliding window, soft-cap and
scale are applied as transformers hands them over, and an option the fallback
cannot honour stops start-up naming it. ``AutoModel`` encoders and
``...ForSequenceClassification`` models of text alone serve embed / classify / score
(:mod:`.pooling`), pooled as their sentence-transformers folder says.

The family declares ``impl="transformers"`` and answers ``runs(architecture,
task)`` from transformers' own auto-class lists (:mod:`.support`), so the
kernel asks it only when no native family lists the architecture (or when
``--model-impl transformers`` asks for it).

Importing the plugin is light (no torch, no transformers); both are imported
when the kernel first asks ``runs`` or a model is loaded.
"""

from __future__ import annotations

from patchbay import hookimpl
from patchbay.model import LoadRequest
from patchbay.registry import ModelFamily

#: the family's name and its --model-impl word
NAME = IMPL = "transformers"
TASKS = frozenset({"generate", "embed", "classify", "score"})


def runs(arch: str, task: str) -> bool:
    """Whether transformers has a class ``arch`` for ``task`` (see :mod:`.support`)."""
    from patchbay_plugins.models.fallback import support

    return support.runs(arch, task)


def load(request: LoadRequest):
    """A :class:`~patchbay.model.GenerativeModel` (generate), a :class:`~patchbay.model.CausalPoolingModel`
    (embed with a causal LM: last-token pooling) or a :class:`~patchbay.model.PoolingModel` (embed with an
    encoder, classify, score)."""
    from patchbay_plugins.models.fallback import support

    archs = list(getattr(request.hf_config, "architectures", None) or [])
    causal = request.task == "generate" or (request.task == "embed" and any(support.is_causal_lm(a) for a in archs))
    if not causal:
        from patchbay_plugins.models.fallback.pooling import load_pooling

        return load_pooling(request)
    from patchbay_plugins.models.fallback.causal import load_causal

    model = load_causal(request)
    if request.task == "embed":
        from patchbay_plugins.models.sentence_transformers import decoder_pooling_facts

        model.pooling = decoder_pooling_facts(request.model_dir, request.hf_config, int(model.config.hidden_size))
    return model


@hookimpl(trylast=True)
def register_model_families(register):
    register(ModelFamily(name=NAME, architectures=(), tasks=TASKS, load=load, impl=IMPL, runs=runs))


__all__ = ["IMPL", "NAME", "TASKS", "load", "register_model_families", "runs"]
