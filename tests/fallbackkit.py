"""Helpers for the transformers fallback's tests: prompts, transformers' ``generate`` as the reference, and
the same requests through the official ``openai`` client (in-process or against a real ``serve``)."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any, Callable

import attrs

from patchbay_plugins.tinymodels.zoo import FALLBACK_ARCHITECTURES

#: every architecture the tests build for the fallback (none has a native family)
FALLBACK_ARCHS = tuple(FALLBACK_ARCHITECTURES)
MAX_TOKENS = 14
_SHARED = ("In the old harbour town the fishermen mended their nets while the gulls circled above the grey "
           "water and the bells of the church rang out")
#: four prompts shorter than one KV block (16 tokens), four longer than a block and than the models' sliding
#: window (12); two of the long ones share a prefix of several blocks (prefix caching)
PROMPTS = (
    "The river",
    "Once upon a time",
    "She opened the door and",
    "Numbers: 1, 2, 3,",
    _SHARED + " for the evening.",
    _SHARED + " while a stranger walked slowly up the hill towards the lighthouse.",
    "A long list of things to remember before the journey: water, bread, a map of the valley, warm "
    "clothes, a lamp, rope, and the letter from the old teacher",
    "When the music stopped, everyone in the crowded hall turned towards the stage where the tall "
    "conductor raised his hand one final time",
)


@attrs.frozen
class Answer:
    """What the tests compare: the text, why it ended, and the usage (``logprobs`` separately, within
    :data:`LOGPROB_ATOL`: logit transforms like a final soft-cap or a logits divisor never change greedy text)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: the chosen tokens' log-probabilities, when asked for
    logprobs: tuple[float, ...] | None = attrs.field(default=None, eq=False)


LOGPROB_ATOL = 2e-4


# --------------------------------------------------------------------------- the reference


def chat_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def reference_answers(model_dir: Path, max_tokens: int = MAX_TOKENS) -> dict[tuple[str, str], Answer]:
    """``{(kind, prompt): Answer}`` of transformers' greedy ``generate`` on ``model_dir`` (kind: completion or
    chat), one prompt at a time, stopping at the folder's generation_config EOS ids as the server does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = GenerationConfig.from_pretrained(model_dir)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    out: dict[tuple[str, str], Answer] = {}
    for prompt in PROMPTS:
        for kind in ("completion", "chat"):
            if kind == "completion":
                ids = tok(prompt).input_ids
            else:
                ids = tok.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=True,
                                              return_dict=False)
            with torch.inference_mode():
                res = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=gen.pad_token_id, output_logits=True, return_dict_in_generate=True)
            seq = res.sequences[0, len(ids):].tolist()
            logprobs = tuple(float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(res.logits, seq))
            stopped = bool(seq) and seq[-1] in eos
            # the server's incremental detokenizer never sends the bytes of a character the output stops inside
            # of; decode() shows them as U+FFFD
            text = tok.decode(seq, skip_special_tokens=True).rstrip("\ufffd")
            out[(kind, prompt)] = Answer(text, "stop" if stopped else "length", len(ids), len(seq), logprobs)
    return out


# --------------------------------------------------------------------------- the server, through openai


def ask(client: Any, model: str, kind: str, prompt: str, stream: bool, max_tokens: int = MAX_TOKENS,
        logprobs: bool = False) -> Answer:
    """One greedy request through the official openai client ``client`` (``logprobs``: with the chosen
    tokens' log-probabilities; not streamed)."""
    common: dict[str, Any] = dict(model=model, max_tokens=max_tokens, temperature=0)
    if logprobs:
        assert not stream
        common["logprobs"] = 1 if kind == "completion" else True
    if stream:
        common["stream"] = True
        common["stream_options"] = {"include_usage": True}
    if kind == "completion":
        resp = client.completions.create(prompt=prompt, **common)
    else:
        resp = client.chat.completions.create(messages=chat_messages(prompt), **common)
    if not stream:
        choice = resp.choices[0]
        text = choice.text if kind == "completion" else choice.message.content
        lps = None
        if logprobs:
            lps = tuple(choice.logprobs.token_logprobs if kind == "completion"
                        else [c.logprob for c in choice.logprobs.content])
        return Answer(text or "", choice.finish_reason, resp.usage.prompt_tokens, resp.usage.completion_tokens, lps)
    parts, finish, usage = [], None, None
    for chunk in resp:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append((choice.text if kind == "completion" else choice.delta.content) or "")
            finish = choice.finish_reason or finish
    assert usage is not None, "no usage chunk in the stream"
    return Answer("".join(parts), finish, usage.prompt_tokens, usage.completion_tokens)


def ask_many(client: Any, model: str, kind: str, prompts: tuple[str, ...], stream: bool) -> list[Answer]:
    """All ``prompts`` at once, from one thread each (the engine batches them); the threads start together
    (on a loaded machine a late thread would find the others' requests finished)."""
    start = threading.Barrier(len(prompts))

    def one(prompt: str) -> Answer:
        start.wait(timeout=60)
        return ask(client, model, kind, prompt, stream)

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def _differs(answer: Answer, want: Answer) -> bool:
    if answer != want:
        return True
    if answer.logprobs is None:
        return False
    return len(answer.logprobs) != len(want.logprobs) or any(
        abs(a - b) > LOGPROB_ATOL for a, b in zip(answer.logprobs, want.logprobs))


def mismatches(got: dict[tuple[str, str, bool, str], Answer],
               want: dict[tuple[str, str], Answer]) -> list[str]:
    """One line per request whose answer (and log-probabilities, where asked for) differs from the reference."""
    return [f"{kind} {'stream' if stream else 'plain'} {mode} {prompt[:30]!r}: got {answer} {answer.logprobs}, "
            f"want {want[(kind, prompt)]} {want[(kind, prompt)].logprobs}"
            for (kind, prompt, stream, mode), answer in got.items() if _differs(answer, want[(kind, prompt)])]


def run_matrix(client: Any, model: str, stats: Callable[[], Any] | None = None
               ) -> dict[tuple[str, str, bool, str], Answer]:
    """Completions and chat, streamed or not: two prompts (one short, one long) alone (with logprobs when not
    streamed), then all eight at once. With ``stats`` (the engine's), checks the eight were batched (fewer
    steps than tokens)."""
    got: dict[tuple[str, str, bool, str], Answer] = {}
    for kind in ("completion", "chat"):
        for stream in (False, True):
            for prompt in (PROMPTS[0], PROMPTS[5]):
                got[(kind, prompt, stream, "alone")] = ask(client, model, kind, prompt, stream, logprobs=not stream)
            before = stats() if stats else None
            for prompt, answer in zip(PROMPTS, ask_many(client, model, kind, PROMPTS, stream)):
                got[(kind, prompt, stream, "batch")] = answer
            if stats:
                after = stats()
                steps, tokens = after.steps - before.steps, after.generated_tokens - before.generated_tokens
                # one after another, every token takes a step of its own (steps >= tokens); fewer steps than
                # tokens means steps carried several sequences. (How many fewer depends on how quickly the
                # requests reach the engine, which a loaded machine spreads out.)
                assert steps < tokens, f"8 concurrent requests took {steps} steps for {tokens} tokens"
    return got
