"""One text-generation request (completions or chat) on the engine: its prompts, each prompt's
sampling parameters (built once, before anything runs), and running its choices — collected,
or streamed as SSE through the endpoint's own chunk shape.

Not a plugin itself; the completions and chat endpoints only translate their wire formats
around it.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

import attrs

from patchbay.engine.params import RequestOutput, SamplingParams
from patchbay.served import ServedModel
from patchbay_plugins.endpoints.generation import Candidate, beam_search, best_n, run_candidates
from patchbay_plugins.endpoints.logprobs import TokenText
from patchbay_plugins.endpoints.streaming import SSE_DONE, merge_streams, raise_engine_error, sse
from patchbay_plugins.endpoints.textgen import child_params, instantiate_processors, now, usage_dict

#: ``chunk(choice index, prompt index, delta)`` -> one SSE chunk's choice, or None to send nothing
ChunkFn = Callable[[int, int, RequestOutput], "dict[str, Any] | None"]


class TextJob:
    """A validated request's prompts and parameters, ready to run.

    ``max_tokens``: what the request asked for (None: the model's generation_config, else
    ``default_max_tokens``); ``logprobs``: top alternatives per output token (None: no
    logprobs); ``prompt_logprobs``: at least this many per prompt token (completions' echo);
    ``mm``: each prompt's images (None: text prompts).
    """

    def __init__(self, model: ServedModel, req: Any, prompts: list[list[int]], *, rid: str, engine_rid: str,
                 name: str, obj: str, max_tokens: int | None, default_max_tokens: int | None,
                 logprobs: int | None, prompt_logprobs: int | None = None, mm: list[Any] | None = None):
        self.model, self.req, self.prompts = model, req, prompts
        self.mm = mm or [None] * len(prompts)
        self.rid, self.engine_rid, self.name, self.obj = rid, engine_rid, name, obj
        self.max_tokens, self.default_max_tokens = max_tokens, default_max_tokens
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.tt = TokenText(model, bool(req.return_tokens_as_token_ids))
        self.refs = req.processors(model)
        self.count = req.best_of or req.n
        self.created = now()
        self.base: list[SamplingParams] = []
        self.admission: Any = None

    def prepare(self, constraint: Any) -> list[SamplingParams]:
        """Build (and so validate) each prompt's parameters, once, and admit the request into the engine's
        waiting queue: a 400 (or a 429 when the queue is full) here precedes any stream."""
        req = self.req
        logprobs = self.logprobs
        if logprobs is None and self.count > req.n:
            logprobs = 0  # best_of ranks candidates by cumulative logprob
        self.base = []
        for ids in self.prompts:
            params = req.sampling_params(self.model, num_prompt_tokens=len(ids), max_tokens=self.max_tokens,
                                         default_max_tokens=self.default_max_tokens, logprobs=logprobs)
            if self.prompt_logprobs is not None:
                params.prompt_logprobs = max(params.prompt_logprobs or 0, self.prompt_logprobs)
            params.constraint = constraint
            self.base.append(params)
        self.admission = self.model.admit(len(self.prompts) * self.count)
        return self.base

    def params(self, p_idx: int, index: int) -> SamplingParams:
        """Choice ``index`` of prompt ``p_idx``: seeded choices differ by seed + index; fresh processors."""
        params = child_params(self.base[p_idx], index)
        if self.refs:
            params = attrs.evolve(params, logits_processors=instantiate_processors(self.refs, self.model,
                                                                                   self.req.vllm_xargs))
        return params

    # ------------------------------------------------------------------ non-streaming

    async def _candidates(self, p_idx: int) -> list[Candidate]:
        req = self.req
        rid = f"{self.engine_rid}-{p_idx}"
        ids = self.prompts[p_idx]
        if req.use_beam_search:
            return await beam_search(self.model, rid, ids, self.params(p_idx, 0), req.n,
                                     length_penalty=req.length_penalty, early_stopping=req.early_stopping,
                                     priority=req.priority, cache_salt=req.cache_salt, mm=self.mm[p_idx])
        cands = await run_candidates(self.model, rid, ids, lambda i: self.params(p_idx, i), self.count,
                                     priority=req.priority, cache_salt=req.cache_salt, mm=self.mm[p_idx])
        return best_n(cands, req.n)

    async def collect(self) -> list[list[Candidate]]:
        """Every prompt's ``n`` finished choices, prompts run concurrently."""
        self.admission.enter()
        tasks = [asyncio.ensure_future(self._candidates(i)) for i in range(len(self.prompts))]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            self.admission.release()
            for t in tasks:
                t.cancel()

    def usage(self, results: list[list[Candidate]]) -> dict[str, Any]:
        completion = sum(c.num_output_tokens for cands in results for c in cands)
        cached = sum(max((c.num_cached_tokens for c in cands), default=0) for cands in results)
        return usage_dict(sum(len(ids) for ids in self.prompts), completion, cached)

    def response(self, choices: list[dict[str, Any]], usage: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"id": self.rid, "object": self.obj, "created": self.created, "model": self.name,
                "choices": choices, "usage": usage, "system_fingerprint": None, **extra}

    # ------------------------------------------------------------------ streaming

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.rid, "object": self.obj, "created": self.created, "model": self.name, "choices": choices}

    async def stream(self, chunk: ChunkFn, first: Callable[[int], dict[str, Any]] | None = None) -> AsyncIterator[bytes]:
        """SSE of every choice's deltas (``n`` per prompt, choice index ``prompt * n + i``): ``first(i)`` opens
        each choice when given; ``stream_options`` add usage; ``[DONE]`` ends it. Places of the
        admission left unused (the client went away first) are given back when the job is dropped."""
        req = self.req
        self.admission.enter()
        streams, prompt_of = [], []
        for p_idx, ids in enumerate(self.prompts):
            for i in range(req.n):
                streams.append(self.model.generate(f"{self.engine_rid}-{p_idx}-{i}", ids, self.params(p_idx, i), priority=req.priority,
                                                   cache_salt=req.cache_salt, mm=self.mm[p_idx]))
                prompt_of.append(p_idx)
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        completion_tokens = [0] * len(streams)
        prompt_tokens = sum(len(ids) for ids in self.prompts)

        def with_usage(body: dict[str, Any]) -> dict[str, Any]:
            if include_usage and continuous:
                body["usage"] = usage_dict(prompt_tokens, sum(completion_tokens))
            return body

        if first is not None:
            for i in range(len(streams)):
                yield sse(with_usage(self.chunk([first(i)])))
        async for idx, out in merge_streams(streams):
            raise_engine_error(out)
            completion_tokens[idx] = out.num_output_tokens
            choice = chunk(idx, prompt_of[idx], out)
            if choice is not None:
                yield sse(with_usage(self.chunk([choice])))
        if include_usage:
            yield sse({**self.chunk([]), "usage": usage_dict(prompt_tokens, sum(completion_tokens))})
        yield SSE_DONE
