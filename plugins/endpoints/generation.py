"""Running the candidates of one prompt on the engine: n / best_of, and beam search.

Not a plugin itself; the completions and chat endpoints share it.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from patchbay.engine.params import SamplingParams, TokenLogprob
from patchbay.engine.stopping import token_stop
from patchbay.served import ServedModel
from patchbay_plugins.endpoints.streaming import merge_streams, raise_engine_error


@attrs.define
class Candidate:
    """One finished candidate (a choice, before n-of-best_of selection)."""

    token_ids: list[int] = attrs.Factory(list)
    text: str = ""
    logprobs: list[TokenLogprob] = attrs.Factory(list)
    text_offsets: list[int] = attrs.Factory(list)
    finish_reason: str | None = None
    stop_reason: Any = None
    num_output_tokens: int = 0
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0


async def run_candidates(
    model: ServedModel,
    rid: str,
    prompt_ids: list[int],
    make_params: Callable[[int], SamplingParams],
    count: int,
    *,
    priority: int = 0,
    cache_salt: str | None = None,
    mm: Any = None,
) -> list[Candidate]:
    """Run ``count`` candidates to the end; ``make_params(i)`` gives candidate i's parameters; ``mm``: the
    prompt's images."""
    streams = [
        model.generate(f"{rid}-{i}", prompt_ids, make_params(i), priority=priority, cache_salt=cache_salt, mm=mm)
        for i in range(count)
    ]
    out = [Candidate() for _ in range(count)]
    async for i, delta in merge_streams(streams):
        raise_engine_error(delta)
        c = out[i]
        c.token_ids += delta.token_ids
        c.text += delta.text
        if delta.logprobs:
            c.logprobs += delta.logprobs
        if delta.text_offsets:
            c.text_offsets += delta.text_offsets
        if delta.prompt_logprobs is not None:
            c.prompt_logprobs = delta.prompt_logprobs
        c.finish_reason = delta.finish_reason
        c.stop_reason = delta.stop_reason
        c.num_output_tokens = delta.num_output_tokens
        c.cumulative_logprob = delta.cumulative_logprob
        c.num_cached_tokens = delta.num_cached_tokens
    return out


def best_n(candidates: list[Candidate], n: int) -> list[Candidate]:
    """The ``n`` candidates with the highest cumulative log-probability (OpenAI's best_of)."""
    if len(candidates) == n:
        return candidates
    return sorted(candidates, key=lambda c: c.cumulative_logprob, reverse=True)[:n]


# --------------------------------------------------------------------------- beam search


def beam_score(num_generated: int, cumulative_logprob: float, length_penalty: float) -> float:
    """Length-normalised score of a beam: ``logprob / len ** length_penalty`` over generated tokens."""
    return cumulative_logprob / (max(num_generated, 1) ** length_penalty)


@attrs.define
class _Beam:
    tokens: list[int]
    logprobs: list[TokenLogprob]
    cum: float
    finished: str | None = None
    stop_reason: Any = None
    #: the last token's text stays in the output (a stop id with include_stop_str_in_output)
    keep_last: bool = True


async def beam_search(
    model: ServedModel,
    rid: str,
    prompt_ids: list[int],
    params: SamplingParams,
    width: int,
    *,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    priority: int = 0,
    cache_salt: str | None = None,
    mm: Any = None,
) -> list[Candidate]:
    """Deterministic beam search of ``width`` beams, expanded one token per engine request.

    Each step asks the engine for the ``2 * width`` most likely next tokens of
    every live beam (its prompt + tokens so far hit the prefix cache), keeps
    the ``width`` best continuations by cumulative log-probability, and sets
    aside beams that ended with EOS or a stop token. Finished and live beams
    are ranked at the end by :func:`beam_score`; with ``early_stopping`` the
    search ends as soon as ``width`` beams have finished.
    """
    eos = frozenset(model.eos_token_ids)
    step_params = attrs.evolve(
        params, max_tokens=1, temperature=0.0, seed=None, logprobs=2 * width, stop=(), min_tokens=0,
        ignore_eos=True, stop_token_ids=(), prompt_logprobs=None, detokenize=False,
    )
    live = [_Beam(tokens=[], logprobs=[], cum=0.0)]
    done: list[_Beam] = []
    for step in range(params.max_tokens):
        results = await _expand(model, f"{rid}-s{step}", prompt_ids, live, step_params, priority, cache_salt, mm)
        grown: list[_Beam] = []
        for beam, entry in zip(live, results):
            for token, lp in entry.top:
                nb = _Beam(tokens=beam.tokens + [token], logprobs=beam.logprobs + [_with_choice(entry, token, lp)],
                           cum=beam.cum + lp)
                ended, nb.stop_reason, nb.keep_last = token_stop(params, eos, token)
                if ended and len(nb.tokens) > params.min_tokens:
                    nb.finished = ended
                    done.append(nb)
                elif not ended:
                    grown.append(nb)
        grown.sort(key=lambda b: b.cum, reverse=True)
        live = grown[:width]
        if not live or (early_stopping and len(done) >= width):
            break
        if len(prompt_ids) + len(live[0].tokens) >= model.max_model_len:
            break
    for beam in live:
        beam.finished = "length"
    ranked = sorted(done + live, key=lambda b: beam_score(len(b.tokens), b.cum, length_penalty), reverse=True)
    out = []
    for beam in ranked[:width]:
        shown = beam.tokens if beam.finished != "stop" or beam.keep_last else beam.tokens[:-1]
        text = model.tokenizer.decode(shown, skip_special_tokens=params.skip_special_tokens)
        out.append(Candidate(
            token_ids=beam.tokens, text=text, logprobs=beam.logprobs, finish_reason=beam.finished,
            stop_reason=beam.stop_reason, num_output_tokens=len(beam.tokens), cumulative_logprob=beam.cum,
        ))
    return out


def _with_choice(entry: TokenLogprob, token: int, lp: float) -> TokenLogprob:
    rank = next((r for r, (t, _) in enumerate(entry.top, 1) if t == token), len(entry.top))
    return TokenLogprob(token, lp, list(entry.top), rank)


async def _expand(model: ServedModel, rid: str, prompt_ids: list[int], beams: list[_Beam], step_params: SamplingParams,
                  priority: int, cache_salt: str | None, mm: Any = None) -> list[TokenLogprob]:
    streams = [
        model.generate(f"{rid}-{i}", prompt_ids + beam.tokens, step_params, priority=priority,
                                cache_salt=cache_salt, mm=mm)
        for i, beam in enumerate(beams)
    ]
    entries: list[Any] = [None] * len(beams)
    async for i, delta in merge_streams(streams):
        raise_engine_error(delta)
        if delta.logprobs:
            entries[i] = delta.logprobs[0]
    return entries
