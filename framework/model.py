"""The model contract: what a model family hands the engine.

A family's ``load(request: LoadRequest)`` returns one object of one of the
kinds below. The loader checks it against the kind's Protocol once, at
start-up (:func:`check_model`), and a family that forgets a member stops the
server with a message naming the family and the member. After that the
loader, engine, runner and endpoints use only what these Protocols name.

- :class:`GenerativeModel` — a decoder over the paged KV cache (text generation).
- :class:`PoolingModel` — an encoder over whole prompts (no KV cache) plus its
  pooler: embeddings, class logits.
- :class:`CausalPoolingModel` — a decoder used as a pooling model: prompts are
  prefilled over the paged cache (chunked, prefix-cached), the last token's
  state is pooled.
- :class:`EncoderDecoderModel` — speech: an encoder run once per input window,
  a decoder on the shared scheduler, with a :class:`SpeechProcessor` (prompts,
  decoding rules, reading the output) and :class:`SpeechFacts`.
- :class:`MultimodalModel` — a decoder whose prompts carry images (or audio)
  turned into embeddings at placeholder tokens.
- :class:`MultimodalPoolingModel` — a pooling model whose inputs are text or an
  image (a dual encoder such as CLIP).

Tensor math that depends on the model — pooling, normalisation, activations,
similarity — lives with the family (the model) or in the runner
(:mod:`patchbay.engine.pooling`), driven by the facts a model declares
(:class:`PoolingFacts`); endpoints only translate wire formats.

Import is light: torch is only named in annotations.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, runtime_checkable

import attrs

from patchbay.errors import StartupError

if TYPE_CHECKING:
    import torch

    from patchbay_kernels.attention import AttentionMetadata

#: task words (vLLM's), each run by one kind of model
GENERATE, EMBED, CLASSIFY, SCORE, TRANSCRIPTION = "generate", "embed", "classify", "score", "transcription"
POOLING_TASKS = (EMBED, CLASSIFY, SCORE)


@attrs.frozen
class LoadRequest:
    """What the loader hands ``ModelFamily.load``: everything needed to build the model."""

    #: the local Hugging Face model directory (config.json, safetensors, tokenizer)
    model_dir: Path
    #: its ``config.json`` as a transformers ``PretrainedConfig``
    hf_config: Any
    #: the task the server runs the model for (one of the family's ``tasks``)
    task: str
    #: the weights' dtype (``--dtype``, resolved)
    dtype: torch.dtype
    #: where the weights live (``--device``, resolved)
    device: torch.device


@attrs.frozen
class KVLayout:
    """The shape of a decoder's paged KV cache: per layer, K and V of ``[blocks, block_size, kv_heads, head_dim]``."""

    #: layers, each with its own K and V cache
    num_layers: int
    #: key/value heads per layer
    num_kv_heads: int
    #: width of one head
    head_dim: int


@attrs.frozen
class PoolingFacts:
    """What a pooling model tells the runner and the endpoints; the family reads them from its folder."""

    #: the pooling tasks it runs: ``("embed",)``, or ``("classify", "score")`` for a cross-encoder
    tasks: tuple[str, ...]
    #: width of its embeddings (0 when it does not embed)
    embedding_size: int = 0
    #: embeddings come L2-normalised (and are re-normalised after a ``dimensions`` cut)
    normalize: bool = False
    #: trained for truncated (Matryoshka) embeddings, so a request's ``dimensions`` may cut them
    matryoshka: bool = False
    #: the only sizes ``dimensions`` may take (None: any up to ``embedding_size``)
    matryoshka_dimensions: tuple[int, ...] | None = None
    #: class names by class index (classifiers)
    labels: tuple[str, ...] = ()
    #: logits to class probabilities: ``"softmax"`` or ``"sigmoid"`` (one label, or multi-label)
    classify_activation: str = "softmax"
    #: ``"cross-encoder"`` (a pair is one input, its one logit the score) or ``"cosine"`` (of two embeddings)
    score_rule: str = "cosine"
    #: a cross-encoder's logit to its score: ``"sigmoid"``, ``"tanh"`` or ``"identity"``
    score_activation: str = "sigmoid"
    #: the longest input it pools, when shorter than its context (sentence-transformers' ``max_seq_length``)
    max_input_tokens: int | None = None
    #: texts are lower-cased before tokenizing (sentence-transformers' ``do_lower_case``)
    lower_case: bool = False
    #: text pairs carry segment ids (BERT's ``token_type_ids``)
    uses_token_type_ids: bool = False
    #: named prompt prefixes (sentence-transformers' ``prompts``, or the config's ``task_instructions``)
    prompts: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class MultimodalItem:
    """One image (or other non-text item) of a prompt: the run of placeholder tokens it occupies, the hash of
    its content, and what the family's processor made of it."""

    #: index of its first placeholder token in the prompt
    offset: int
    #: how many placeholder tokens (= embeddings) it becomes
    length: int
    #: content hash: part of the prefix-cache keys of the blocks it touches, and the encoder cache's key
    hash: str
    #: the family's processed form (pixels), what :meth:`MultimodalModel.embed_items` takes
    data: Any = attrs.field(eq=False, repr=False)

    @property
    def end(self) -> int:
        return self.offset + self.length


@attrs.frozen
class MultimodalInputs:
    """The non-text items of one prompt, in prompt order (their placeholder runs do not overlap)."""

    items: tuple[MultimodalItem, ...]

    def overlapping(self, start: int, end: int) -> list[MultimodalItem]:
        """The items whose placeholders lie (partly) in prompt positions ``[start, end)``."""
        return [it for it in self.items if it.offset < end and it.end > start]


@attrs.frozen
class PoolingBatch:
    """One encoder forward: several whole prompts, concatenated without padding."""

    #: ``[T]`` long: the prompts' tokens one after another
    input_ids: torch.Tensor
    #: each prompt's length (they sum to ``T``)
    seq_lens: list[int]
    #: ``[T]`` long segment ids for text pairs, or None
    token_type_ids: torch.Tensor | None
    #: ``"embed"`` (embeddings) or ``"classify"`` (class logits; cross-encoders score with it too)
    task: str
    #: per prompt, its images (an image prompt's tokens are placeholders), or None for text; None: all text
    mm: Sequence[MultimodalInputs | None] | None = None


# --------------------------------------------------------------------------- the kinds


@runtime_checkable
class GenerativeModel(Protocol):
    """A decoder over the paged KV cache, run by the engine's ModelRunner.

    Each engine step is one flat batch of new tokens: the decode tokens of
    running sequences first (one each), then prefill chunks. The runner
    writes nothing into the cache itself: ``forward`` stores each new token's
    K/V at ``meta.slot_mapping`` and attends over the blocks ``meta`` names.
    The runner then asks for logits of only the rows it samples from.
    """

    #: dtype of the weights and of the KV cache
    dtype: torch.dtype
    #: device of the weights and of the KV cache
    device: torch.device
    #: width of the logits (may exceed the tokenizer's length)
    vocab_size: int
    #: the longest context the model takes (``--max-model-len`` may only lower it)
    max_position_embeddings: int
    #: a window every layer attends within (None: none); per-layer windows are the model's own business
    sliding_window: int | None
    #: layers, KV heads and head width of the cache the engine allocates for it
    kv_layout: KVLayout
    #: number of weights (chooses the thread count for tiny models)
    num_parameters: int

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` of the step's tokens ``input_ids`` ``[T]`` at ``positions`` ``[T]``."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[N, vocab_size]`` of hidden rows ``[N, hidden]`` (only the rows sampled from)."""


@runtime_checkable
class PoolingModel(Protocol):
    """An encoder plus its pooler over whole prompts, run by the engine's EncoderRunner (no KV cache)."""

    dtype: torch.dtype
    device: torch.device
    #: rows of its token embedding table (the token ids it takes)
    vocab_size: int
    #: the longest input it takes
    max_position_embeddings: int
    num_parameters: int
    #: what it pools and how its outputs are to be read
    pooling: PoolingFacts

    def pool(self, batch: PoolingBatch) -> torch.Tensor:
        """float32 ``[B, D]``: each prompt's embedding (pooled and normalised as the folder says) or class logits."""


@runtime_checkable
class CausalPoolingModel(GenerativeModel, Protocol):
    """A decoder used as a pooling model (``--convert embed``): prompts prefill over the paged cache
    (chunked and prefix-cached like generation) and the last token's final state is pooled."""

    pooling: PoolingFacts

    def pool_last(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 embeddings ``[N, D]`` of each prompt's last-token hidden state ``[N, hidden]``."""


@runtime_checkable
class InputProcessor(Protocol):
    """The family's own preprocessing of non-text inputs (audio features, image pixels)."""

    def __call__(self, raw: Any) -> Any:
        """Tensors the model's encoder takes, from one decoded input (a waveform, an RGB image)."""


# --------------------------------------------------------------------------- speech (encoder-decoder)


@attrs.frozen
class SpeechFacts:
    """What a speech model tells the serving layer and the endpoints; the family reads them from its folder."""

    #: the rate (Hz) waveforms are resampled to before the processor sees them
    sampling_rate: int
    #: seconds of audio one encoder window holds; longer audio is transcribed window after window
    window_seconds: float
    #: the languages (ISO 639-1 codes, as Whisper spells them) it can be told, or detects when told none;
    #: empty: a single-language model that takes no language
    languages: tuple[str, ...] = ()
    #: it translates speech into English (task ``"translate"``) as well as transcribing it
    translates: bool = False
    #: it can decode segment timestamps (``verbose_json``, ``srt``, ``vtt``)
    timestamps: bool = False
    #: it can align words with the audio (``timestamp_granularities: ["word"]``)
    word_timestamps: bool = False


@attrs.frozen
class SpeechWindow:
    """One window of audio and what to do with it: the serving layer's question to the processor."""

    #: float32 ``[n]`` samples at ``SpeechFacts.sampling_rate``, at most ``window_seconds`` long
    waveform: torch.Tensor
    #: ``"transcribe"`` or ``"translate"``
    task: str = "transcribe"
    #: the spoken language (a code of ``SpeechFacts.languages``), or None: the model detects it
    language: str | None = None
    #: the request's prompt text (Whisper's "previous text"), or ""
    prompt: str = ""
    #: text tokens of the windows before this one (the transcript continues across windows)
    previous_ids: tuple[int, ...] = ()
    #: decode segment timestamps
    timestamps: bool = False
    #: align each output token with the audio (word timestamps)
    word_timestamps: bool = False


@attrs.frozen
class DecoderStart:
    """How the decoder starts on one window: what the serving layer submits to the engine."""

    #: the decoder prompt
    prompt_ids: list[int]
    #: what :meth:`EncoderDecoderModel.encode` takes for this window (held by the sequence until encoded)
    encoder_input: Any
    #: per-sequence logits processors (``patchbay.logits.LogitsProcessor``) the family's decoding rules need
    logits_processors: tuple[Any, ...] = ()
    #: tokens never shown in the text (timestamps), special in the tokenizer or not
    hidden_token_ids: frozenset[int] = frozenset()
    #: how many first output tokens the rules force (a detected language, the task): counted with the prompt
    forced_outputs: int = 0


@attrs.frozen
class SpeechSegment:
    """A stretch of a window's transcript with its times (seconds from the window's start)."""

    start: float
    end: float
    text: str
    token_ids: tuple[int, ...]
    #: positions of its tokens among the window's output tokens (for their log-probabilities)
    output_positions: tuple[int, ...] = ()


@attrs.frozen
class SpeechWord:
    """A word and its times (seconds from the window's start)."""

    word: str
    start: float
    end: float


@attrs.frozen
class WindowResult:
    """What the processor reads from a window's finished output."""

    #: the language spoken (told or detected), or None for a model that takes none
    language: str | None
    #: the window's text tokens (no special tokens), continued by the next window's prompt
    text_ids: tuple[int, ...]
    #: the window's segments, ordered (timestamps asked for: as the model timed them; else one)
    segments: tuple[SpeechSegment, ...] = ()
    #: the window's words (word timestamps asked for)
    words: tuple[SpeechWord, ...] = ()


@runtime_checkable
class SpeechProcessor(Protocol):
    """A speech family's prompts and output rules, between raw audio windows and the engine."""

    facts: SpeechFacts

    def start(self, window: SpeechWindow) -> DecoderStart:
        """The decoder prompt, encoder input and decoding rules of one window (runs off the event loop)."""

    def finish(self, window: SpeechWindow, output_ids: Sequence[int], encoder_result: Any) -> WindowResult:
        """Read the window's output tokens (``encoder_result``: what :meth:`EncoderDecoderModel.finish_request`
        reported for it)."""


@runtime_checkable
class EncoderDecoderModel(GenerativeModel, Protocol):
    """Speech (Whisper-style): the encoder runs once per input window, batched across the requests a step
    admits; its cross-attention states are held per request (``Sequence.encoder_state``, kept through
    preemption, freed when the request ends); the decoder runs on the shared scheduler like any
    :class:`GenerativeModel` (``max_position_embeddings``: prompt + output of one window), its
    self-attention over the paged cache, and its ``forward`` also gets the step's encoder states."""

    #: prompts, decoding rules and output reading (audio windows to and from the engine)
    processor: SpeechProcessor

    def encode(self, inputs: Sequence[Any]) -> Sequence[Any]:
        """Run the encoder once over several windows' ``DecoderStart.encoder_input``; one state per input,
        held by its sequence (the cross-attention keys and values)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        encoder_states: Sequence[Any],
    ) -> torch.Tensor:
        """As :meth:`GenerativeModel.forward`, each token also attending to its sequence's encoder state:
        ``encoder_states[i]`` is the state of the step's i-th sequence — the decodes first (row ``i``),
        then the prefill chunks in ``meta.prefills`` order."""

    def finish_request(self, state: Any, completed: bool) -> Any:
        """Called once when a sequence holding ``state`` leaves the engine for good (finished, aborted or
        failed); frees what the state holds and, for a completed one, returns the family's report on it
        (e.g. token-to-audio alignment), delivered as the last output's ``encoder_result``."""


@runtime_checkable
class ImageProcessor(Protocol):
    """The family's own image preprocessing (its folder's ``preprocessor_config.json``), in torch."""

    def __call__(self, image: Any) -> Any:
        """What the model's encoder takes (e.g. ``[3, H, W]`` float32 pixels) of one decoded Pillow image (any mode)."""

    def num_placeholders(self, processed: Any) -> int:
        """How many placeholder tokens (= embeddings) the processed image becomes."""


@runtime_checkable
class MultimodalModel(GenerativeModel, Protocol):
    """A decoder whose prompts carry images: each image becomes embeddings placed at its run of placeholder
    tokens; the rest runs as any :class:`GenerativeModel`.

    The endpoint renders ``image_token`` once per image (the chat template does, from ``{"type": "image"}``
    parts); the server expands each occurrence (``placeholder_token_id``) to ``processor.num_placeholders``
    copies and records a :class:`MultimodalItem` per image. Each step, the runner embeds the step's tokens
    (:meth:`embed_input_ids`), overwrites the rows of placeholder positions with the images' embeddings
    (:meth:`embed_items`, cached by image hash, so a prefill chunk that cuts an image in two, a preempted
    sequence that is recomputed, or the same image sent again does not encode it again) and runs
    :meth:`forward_embeds`.
    """

    #: decoded images to the data :meth:`embed_items` takes
    processor: ImageProcessor
    #: the text the chat template writes for one image (e.g. ``"<image>"``), a single token
    image_token: str
    #: that token's id: each occurrence in a prompt stands for one image's placeholders
    placeholder_token_id: int

    def embed_items(self, items: Sequence[Any]) -> Sequence[torch.Tensor]:
        """Each processed image's embeddings ``[num_placeholders, hidden]`` (model dtype), in order."""

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings ``[T, hidden]`` of ``input_ids`` ``[T]`` (the decoder's input)."""

    def forward_embeds(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """:meth:`forward` from input embeddings ``[T, hidden]`` instead of token ids."""


@runtime_checkable
class MultimodalPoolingModel(PoolingModel, Protocol):
    """A pooling model whose inputs are text or one image (a dual encoder: CLIP). An image input reaches
    :meth:`pool` as a prompt of ``processor.num_placeholders`` placeholder tokens whose ``PoolingBatch.mm``
    entry holds the image (one :class:`MultimodalItem`); text prompts have None there."""

    #: decoded images to the data :meth:`pool` takes
    processor: ImageProcessor


#: which kinds may serve a task, most specific first
KINDS_FOR_TASK: dict[str, tuple[type, ...]] = {
    GENERATE: (MultimodalModel, GenerativeModel),
    EMBED: (MultimodalPoolingModel, PoolingModel, CausalPoolingModel),
    CLASSIFY: (PoolingModel,),
    SCORE: (PoolingModel,),
    TRANSCRIPTION: (EncoderDecoderModel,),
}


#: kinds run by the EncoderRunner (whole prompts, no KV cache)
ENCODER_KINDS: tuple[type, ...] = (PoolingModel, MultimodalPoolingModel)
#: kinds whose prompts may carry images
IMAGE_KINDS: tuple[type, ...] = (MultimodalModel, MultimodalPoolingModel)


def protocol_members(proto: type) -> list[str]:
    """The members a Protocol names: its annotated attributes and methods, bases included."""
    names: list[str] = []
    for klass in reversed(proto.__mro__):
        if klass in (object, Protocol, typing.Generic) or not getattr(klass, "_is_protocol", False):
            continue
        for name in list(klass.__dict__.get("__annotations__", {})) + [
            n for n, v in klass.__dict__.items() if callable(v) and not n.startswith("_")
        ]:
            if name not in names:
                names.append(name)
    return names


def missing_members(obj: Any, proto: type) -> list[str]:
    return [name for name in protocol_members(proto) if not hasattr(obj, name)]


#: members that are themselves held to a Protocol: kind -> {member: Protocol}
NESTED_MEMBERS: dict[type, dict[str, type]] = {EncoderDecoderModel: {"processor": SpeechProcessor}}


def check_model(family: str, task: str, model: Any) -> type:
    """The kind ``model`` is (for ``task``), or a :class:`StartupError` naming the family and what is missing."""
    kinds = KINDS_FOR_TASK[task]
    for kind in kinds:
        if not missing_members(model, kind):
            for member, proto in NESTED_MEMBERS.get(kind, {}).items():
                lacking = missing_members(getattr(model, member), proto)
                if lacking:
                    raise StartupError(f"model family {family!r}: the {member} of its {kind.__name__} is not a "
                                       f"{proto.__name__} (patchbay.model): it lacks {', '.join(lacking)}")
            return kind
    why = "; ".join(f"as a {k.__name__} it lacks {', '.join(missing_members(model, k))}" for k in kinds)
    raise StartupError(f"model family {family!r} returned a {type(model).__name__} for task {task!r} that does not "
                       f"fulfil the model contract (patchbay.model): {why}")


__all__ = [
    "CLASSIFY", "EMBED", "ENCODER_KINDS", "GENERATE", "IMAGE_KINDS", "KINDS_FOR_TASK", "POOLING_TASKS", "SCORE",
    "TRANSCRIPTION", "CausalPoolingModel", "DecoderStart", "EncoderDecoderModel", "GenerativeModel",
    "ImageProcessor", "InputProcessor", "KVLayout", "LoadRequest", "MultimodalInputs", "MultimodalItem",
    "MultimodalModel", "MultimodalPoolingModel", "PoolingBatch", "PoolingFacts", "PoolingModel", "SpeechFacts",
    "SpeechProcessor", "SpeechSegment", "SpeechWindow", "SpeechWord", "WindowResult", "check_model",
    "missing_members", "protocol_members",
]
