"""Pooling work (embed / classify) through the shared engine: encoders and decoders-as-embedders."""

from __future__ import annotations

import asyncio

import torch
import torch.nn.functional as F

from enginekit import build_serving
from patchbay.engine.params import PoolingParams


def encode_all(serving, prompts, task="embed", types=None):
    async def main():
        return await asyncio.gather(*(
            serving.engine.encode(f"e{i}", p, PoolingParams(task=task if isinstance(task, str) else task[i],
                                                            token_type_ids=None if types is None else types[i]))
            for i, p in enumerate(prompts)))

    return asyncio.run(main())


def test_encoder_batches_through_the_engine(tiny_encoder_factory):
    model_dir = tiny_encoder_factory("BertModel", sentence_transformers=True)
    serving = build_serving(model_dir, max_model_len=None)
    assert serving.tasks == ["embed", "score"]
    serving.start()
    try:
        tok = serving.tokenizer
        texts = ["a short one", "a somewhat longer sentence about rivers and seas", "x"]
        prompts = [tok(t)["input_ids"] for t in texts]
        outs = encode_all(serving, prompts)
        model = serving.engine.runner.model
        for p, out in zip(prompts, outs):
            alone = model.forward_pool(torch.tensor(p), None, [len(p)], "embed")[0]
            torch.testing.assert_close(out.pooled, alone.float(), atol=1e-5, rtol=1e-5)
        assert serving.engine.steps < len(prompts)  # several prompts per step
    finally:
        serving.stop()


def test_cross_encoder_with_token_types(tiny_encoder_factory):
    model_dir = tiny_encoder_factory("BertForSequenceClassification", num_labels=1)
    serving = build_serving(model_dir, max_model_len=None)
    assert serving.tasks == ["classify", "score"]
    serving.start()
    try:
        enc = serving.tokenizer("what is it", "a river")
        probs, score = encode_all(serving, [enc["input_ids"]] * 2, task=["classify", "score"],
                                  types=[enc["token_type_ids"]] * 2)
        logit = serving.engine.runner.model.forward_pool(torch.tensor(enc["input_ids"]),
                                                         torch.tensor(enc["token_type_ids"]),
                                                         [len(enc["input_ids"])], "classify")[0].float()
        # one label: the probability and the score are both its sigmoid (mixed tasks share a step)
        torch.testing.assert_close(probs.pooled, torch.sigmoid(logit))
        torch.testing.assert_close(score.pooled, torch.sigmoid(logit))
    finally:
        serving.stop()


def test_prompt_over_the_token_budget_is_an_error_not_a_hang(tiny_encoder_factory):
    serving = build_serving(tiny_encoder_factory("BertModel"), max_model_len=None, max_num_batched_tokens=8)
    serving.start()
    try:
        (out,) = encode_all(serving, [list(range(5, 20))])
        assert out.finish_reason == "error" and "max-num-batched-tokens" in out.error
    finally:
        serving.stop()


def test_decoder_as_embedder_pools_the_last_token(tiny_llama):
    from transformers import AutoModel

    serving = build_serving(tiny_llama, convert="embed", max_num_batched_tokens=16)
    assert serving.tasks == ["embed", "score"]
    serving.start()
    try:
        prompts = [serving.encode("a river runs through it, long enough to need chunks"), serving.encode("short")]
        outs = encode_all(serving, prompts)
        hf = AutoModel.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        for p, out in zip(prompts, outs):
            with torch.inference_mode():
                last = hf(torch.tensor([p])).last_hidden_state[0, -1]
            torch.testing.assert_close(out.pooled, F.normalize(last, dim=-1), atol=1e-4, rtol=1e-4)
    finally:
        serving.stop()
