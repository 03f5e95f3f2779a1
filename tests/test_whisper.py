"""The whisper family against transformers' own Whisper on the same folder: features, encoder, logits,
greedy decoding (language given or detected, with a prompt, translating, with timestamps), token
alignment; batched with other work; and the contract check of its processor."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from apikit import api_client
from patchbay.audio import Waveform
from patchbay.registry import StartupError
from speechkit import RATE, clip, oracle

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def served(tiny_whisper):
    with api_client(tiny_whisper, max_model_len=None, plugins=("audio", "models", "whisper")) as client:
        yield client


def run(client, samples, **job_fields):
    """Transcribe through the served model: ``(transcript, joined deltas, delta token ids)``."""
    from patchbay.speech import SpeechJob, Transcript

    async def go():
        deltas, tokens, final = "", [], None
        async for event in client.model.transcribe("t", Waveform(samples, RATE), SpeechJob(**job_fields)):
            if isinstance(event, Transcript):
                final = event
            else:
                deltas += event.text
                tokens += event.token_ids
        return final, deltas, tokens

    return client.blocking_portal.call(go)


def test_features_and_encoder_equal_transformers(tiny_whisper, served):
    from patchbay_plugins.models.whisper.processor import WhisperInput

    ref = oracle(tiny_whisper)
    model = served.model.engine.runner.model
    for seconds in (0.7, 12.3, 30.0):
        samples = clip(int(seconds * 10), seconds)
        feats = model.processor.logmel(torch.from_numpy(samples))
        want = ref.features(samples)[0]
        assert feats.shape == want.shape == (80, 3000)
        torch.testing.assert_close(feats, want, rtol=0, atol=1e-5)
    state = model.encode([WhisperInput(feats, 3000)])[0]
    with torch.no_grad():
        enc = ref.model.model.encoder(want[None]).last_hidden_state
        layer = ref.model.model.decoder.layers[1].encoder_attn
        k = layer.k_proj(enc)[0].view(1500, model.heads, -1)  # token-major, as the state holds them
        v = layer.v_proj(enc)[0].view(1500, model.heads, -1)
    torch.testing.assert_close(state.keys[1], k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.values[1], v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("language", ["en", "de", None])
def test_greedy_text_equals_transformers_generate(tiny_whisper, served, language):
    ref = oracle(tiny_whisper)
    samples = clip(3, 4.2)
    kwargs = {"language": language} if language else {}
    want = ref.generate(samples, task="transcribe", **kwargs).sequences[0].tolist()
    got, deltas, tokens = run(served, samples, language=language)
    # detected: the language, task and notimestamps are the decoder's first outputs, counted as prompt tokens
    # and not streamed as text tokens, so both cases read the same
    prompt = 4
    assert want[:4] + tokens == want, "token ids differ from transformers'"
    assert got.text == deltas == ref.processor.batch_decode([want], skip_special_tokens=True)[0]
    assert got.language == (language or ref.processor.tokenizer.convert_ids_to_tokens(want[1])[2:-2])
    assert got.prompt_tokens == prompt and got.completion_tokens == len(want) - prompt


def test_prompt_goes_in_as_previous_text_as_transformers_does(tiny_whisper, served):
    ref = oracle(tiny_whisper)
    samples = clip(5, 3.0)
    prompt = "Brown quick foxes jump"
    prompt_ids = ref.processor.get_prompt_ids(prompt, return_tensors="pt")
    want = ref.generate(samples, task="transcribe", language="en", prompt_ids=prompt_ids).sequences[0].tolist()
    got, _, tokens = run(served, samples, language="en", prompt=prompt)
    assert tokens == want[len(prompt_ids) + 4:]
    assert got.text == ref.processor.decode(want[len(prompt_ids) + 4:], skip_special_tokens=True)
    without, _, _ = run(served, samples, language="en")
    assert without.text != got.text or without.prompt_tokens != got.prompt_tokens


def test_translate_equals_transformers(tiny_whisper, served):
    ref = oracle(tiny_whisper)
    samples = clip(6, 5.0)
    want = ref.generate(samples, task="translate", language="fr").sequences[0].tolist()
    assert want[2] == ref.generation_config.task_to_id["translate"]
    _, _, tokens = run(served, samples, task="translate", language="fr")
    assert tokens == want[4:]


def test_timestamp_decoding_equals_transformers(tiny_whisper, served):
    """Whisper's timestamp rules (pairs, monotone, a timestamp first) give transformers' tokens."""
    ref = oracle(tiny_whisper)
    samples = clip(7, 6.0)
    want = ref.generate(samples, task="transcribe", language="en", return_timestamps=True)
    seq = want.sequences[0].tolist()
    got, _, tokens = run(served, samples, language="en", timestamps=True)
    begin = ref.generation_config.no_timestamps_token_id + 1
    assert tokens[0] >= begin, "the first free token is a timestamp"
    assert tokens == [t for t in seq[3:]], (tokens[:10], seq[:13])
    seg = got.segments
    assert seg[0].start == 0 and seg[-1].end == pytest.approx(6.0)
    assert all(a.end == b.start and a.start < a.end for a, b in zip(seg, seg[1:]))


def test_token_alignment_equals_transformers(tiny_whisper, served):
    """Word times come from the alignment heads' cross-attention and DTW, as transformers computes
    ``return_token_timestamps``."""
    ref = oracle(tiny_whisper)
    samples = clip(8, 8.0)
    want = ref.generate(samples, task="transcribe", language="en", return_token_timestamps=True)
    times = want["token_timestamps"][0].tolist()
    model = served.model.engine.runner.model
    from patchbay.model import SpeechWindow

    window = SpeechWindow(waveform=torch.from_numpy(samples), language="en", word_timestamps=True)
    start = model.processor.start(window)

    async def go():
        async for out in served.model.engine.generate("align", start.prompt_ids, _params(start), encoder_input=start.encoder_input):
            if out.finished:
                return out.encoder_result

    got = served.blocking_portal.call(go)
    assert got == pytest.approx(times[4:], abs=1e-6)


def _params(start):
    from patchbay.engine.params import SamplingParams

    return SamplingParams(max_tokens=1000, temperature=0.0, logits_processors=start.logits_processors,
                          hidden_token_ids=start.hidden_token_ids)


def test_greedy_is_the_same_whatever_else_runs(tiny_whisper, served):
    """Eight clips at once (the decoders batched, the encoder over several windows in a step) give each
    clip the text it gets alone."""
    clips = [clip(20 + i, 2.0 + i) for i in range(6)]
    alone = [run(served, c, language="en")[0].text for c in clips]
    assert len(set(alone)) > 1, "the clips should not all read the same"
    from patchbay.speech import SpeechJob, Transcript

    async def together():
        async def one(i, c):
            async for event in served.model.transcribe(f"b{i}", Waveform(c, RATE), SpeechJob(language="en")):
                if isinstance(event, Transcript):
                    return event.text, event.completion_tokens
        return await asyncio.gather(*(one(i, c) for i, c in enumerate(clips)))

    steps = served.model.stats().steps
    model = served.model.engine.runner.model
    batches = []

    def encode(inputs):
        batches.append(len(inputs))
        return type(model).encode(model, inputs)

    model.encode = encode
    try:
        results = served.blocking_portal.call(together)
    finally:
        del model.encode
    assert sum(batches) == len(clips) and max(batches) > 1, batches  # one encoder pass per window, batched
    assert [text for text, _ in results] == alone
    stats = served.model.stats()
    assert stats.running == 0 and stats.free_blocks == stats.total_blocks
    tokens = sum(n for _, n in results)
    assert stats.steps - steps < tokens / 2, "the decoders of different requests ran in the same steps"


def test_sampling_is_reproducible_with_a_seed(served):
    from patchbay.engine.params import SamplingParams

    samples = clip(9, 3.0)

    def sample(seed):
        params = SamplingParams(max_tokens=1 << 30, temperature=0.9, seed=seed)
        return run(served, samples, language="en", params=params)[0].text

    first = sample(3)
    assert sample(3) == first
    assert any(sample(s) != first for s in (4, 5, 6))


def test_a_processor_missing_a_member_stops_startup(tiny_whisper, tmp_path):
    from patchbay import hookimpl
    from patchbay.registry import ModelFamily

    class Broken:
        @hookimpl
        def register_model_families(self, register):
            def load(request):
                from patchbay_plugins.models import whisper

                model = whisper.load(request)
                model.processor = type("NoFinish", (), {"facts": model.processor.facts, "start": None})()
                return model

            register(ModelFamily(name="broken", architectures=("WhisperForConditionalGeneration",),
                                 tasks=frozenset({"transcription"}), load=load))

    with pytest.raises(StartupError, match=r"model family 'broken'.*processor.*lacks finish"):
        with api_client(tiny_whisper, max_model_len=None, plugins=("models",), extra_plugins=[("broken", Broken())]):
            pass


def test_an_english_only_folder_takes_no_language_tokens(tiny_whisper_factory, tmp_path):
    folder = tiny_whisper_factory(multilingual=False)
    ref = oracle(folder)
    samples = clip(11, 3.0)
    want = ref.generate(samples).sequences[0].tolist()
    with api_client(folder, max_model_len=None, plugins=("audio", "models", "whisper")) as client:
        assert client.model.speech_facts.languages == ("en",) and not client.model.speech_facts.translates
        got, _, tokens = run(client, samples)
    assert want[:2] == [ref.generation_config.decoder_start_token_id, ref.generation_config.no_timestamps_token_id]
    assert tokens == want[2:] and got.language == "en"


def test_generation_config_is_what_transformers_reads(tiny_whisper):
    gen = json.loads((tiny_whisper / "generation_config.json").read_text())
    for key in ("lang_to_id", "task_to_id", "no_timestamps_token_id", "alignment_heads", "suppress_tokens",
                "begin_suppress_tokens", "decoder_start_token_id", "prev_sot_token_id"):
        assert key in gen, key


def test_a_step_admits_at_most_max_encoder_inputs_windows_and_they_never_share_prefix_blocks():
    from patchbay.engine.blocks import BlockManager
    from patchbay.engine.params import SamplingParams
    from patchbay.engine.scheduler import Scheduler
    from patchbay.engine.sequence import Sequence

    sched = Scheduler(BlockManager(256, 4), max_num_seqs=64, max_num_batched_tokens=2048, max_encoder_inputs=5)
    seqs = [Sequence(f"s{i}", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4), None, encoder_input=object())
            for i in range(12)]
    plain = Sequence("text", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4), None)
    for seq in seqs + [plain]:
        sched.add(seq)
    batch = sched.schedule()
    assert [s.request_id for s, _ in batch.prefills] == [f"s{i}" for i in range(5)]
    sched.after_step(batch)
    assert len({s.cache_salt for s in seqs}) == len(seqs)  # same tokens, different audio: no shared blocks
    for seq in seqs[:5]:
        seq.encoder_input = None  # encoded, and a token sampled
        seq.token_ids.append(7)
    assert [s.request_id for s, _ in sched.schedule().prefills] == [f"s{i}" for i in range(5, 10)]
