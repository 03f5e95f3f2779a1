"""Which architectures transformers knows, per task; loading a transformers model class from a folder.

``runs(architecture, task)`` is the family's answer to the kernel: an architecture
transformers lists among its ``AutoModelForCausalLM`` classes (generate; also
embed, as a decoder used as an embedder), its ``AutoModel`` classes (embed) or its
``AutoModelForSequenceClassification`` classes (classify, score) — for embed,
classify and score only models of text alone: a model type transformers also lists
for image-text-to-text, speech or sequence-to-sequence (CLIP, Whisper, Llava, T5)
needs inputs or a decoder the fallback's encoder path does not give, and a model type
it lists for no text task (ViT, Wav2Vec2) reads no text at all. The lists are
transformers' own ``*_MAPPING_NAMES``, read on first use from the source of
``transformers.models.auto.modeling_auto`` without importing it: the kernel asks
``runs`` in serve's main process, which must not import torch (it forks the
server's worker afterwards), and importing that module imports torch.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
from pathlib import Path
from typing import Any, Iterator

#: task -> the transformers auto-class mappings whose architectures serve it
_MAPPINGS = {
    "generate": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",),
    "embed": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_MAPPING_NAMES"),
    "classify": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",),
    "score": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",),
}
TASKS = frozenset(_MAPPINGS)
#: a model type listed here reads text (an AutoModel of it is a text encoder or decoder) ...
_TEXT = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
         "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES")
#: ... unless it is listed here too: its models take images or audio, or run a decoder after the encoder
_NOT_TEXT_ONLY = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
                  "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES")


_WANTED = frozenset(m for ms in _MAPPINGS.values() for m in ms) | frozenset(_TEXT) | frozenset(_NOT_TEXT_ONLY)


@functools.lru_cache(maxsize=None)
def mapping_names() -> dict[str, dict[str, Any]]:
    """transformers' ``{mapping: {model_type: class name(s)}}`` for the mappings the tasks use, read from the
    source of ``modeling_auto`` (its ``OrderedDict([...])`` literals); imported only if that fails."""
    spec = importlib.util.find_spec("transformers")  # finds the package without importing it
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "models" / "auto" / "modeling_auto.py"
    found: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(OSError, SyntaxError, ValueError, TypeError, IndexError):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id in _WANTED):
                value = node.value.args[0] if isinstance(node.value, ast.Call) else node.value
                found[node.targets[0].id] = dict(ast.literal_eval(value))
    if set(found) != _WANTED:
        from transformers.models.auto import modeling_auto

        found = {name: dict(getattr(modeling_auto, name)) for name in _WANTED}
    return found


@functools.lru_cache(maxsize=None)
def known_architectures(mapping: str, text_only: bool = False) -> frozenset[str]:
    """The class names of one of transformers' auto-class mappings (model_type -> class name(s)); with
    ``text_only``, of the model types that read text alone (see the module docstring)."""
    names: set[str] = set()
    for model_type, value in mapping_names()[mapping].items():
        if text_only and model_type not in text_only_model_types():
            continue
        names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


@functools.lru_cache(maxsize=None)
def text_only_model_types() -> frozenset[str]:
    """The model types transformers lists for a text task and for no image, speech or seq2seq one."""
    found = mapping_names()
    text = {t for m in _TEXT for t in found[m]}
    return frozenset(text - {t for m in _NOT_TEXT_ONLY for t in found[m]})


def causal_model_types() -> frozenset[str]:
    """The ``model_type`` values transformers has a causal LM for."""
    return frozenset(mapping_names()["MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"])


def is_causal_lm(arch: str) -> bool:
    return arch in known_architectures("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")


def runs(arch: str, task: str) -> bool:
    """Whether transformers has a class ``arch`` for ``task`` that the fallback serves (the family's ``runs``):
    any causal LM; for the encoder tasks, models of text alone."""
    if is_causal_lm(arch):
        return task in ("generate", "embed")
    return task != "generate" and any(arch in known_architectures(m, text_only=True) for m in _MAPPINGS.get(task, ()))


def model_class(archs: list[str], task: str) -> tuple[str, Any]:
    """``(architecture, transformers class)`` of the first of ``archs`` transformers has for ``task``."""
    import transformers

    for arch in archs:
        if runs(arch, task):
            return arch, getattr(transformers, arch)
    raise ValueError(f"transformers {transformers.__version__} has no class for {archs} for task {task!r}")


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bars while transformers loads a checkpoint (they go to the server's log)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def from_folder(cls: Any, model_dir: Path, dtype: Any, device: Any, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` of a local folder, in ``dtype`` on ``device``, in eval mode; refuses a checkpoint
    that leaves weights out (transformers would initialise them at random)."""
    from patchbay.weights import CheckpointError

    with quiet_loading():
        model, info = cls.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True, trust_remote_code=False,
                                          output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(m) for m in info.get("mismatched_keys") or ())
    if missing or mismatched:
        what = "; ".join(x for x in (f"missing {', '.join(missing[:8])}" if missing else "",
                                     f"of another shape {', '.join(mismatched[:8])}" if mismatched else "") if x)
        raise CheckpointError(f"{model_dir}: the checkpoint does not fit transformers' {cls.__name__}: weights {what}")
    return model.to(device).eval()
