"""The llama model family against transformers' own forward, on tiny random models.

Every comparison runs transformers (eager attention, its own KV cache) and our
plugin (paged cache with deliberately shuffled blocks) on the same tokens, and
compares the logits at every position.
"""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from patchbay.weights import CheckpointError
from patchbay_kernels.attention import AttentionMetadata, PrefillChunk
from patchbay_plugins.models import llama as llama_plugin

torch.set_num_threads(1)

ATOL = 1e-4


# --------------------------------------------------------------------------- helpers


def hf_model(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return model.eval()


def our_model(model_dir, dtype=torch.float32):
    from transformers import AutoConfig

    from patchbay.model import LoadRequest

    cfg = AutoConfig.from_pretrained(model_dir)
    return llama_plugin.load(LoadRequest(model_dir=model_dir, hf_config=cfg, task="generate", dtype=dtype,
                                         device=torch.device("cpu")))


class PagedCache:
    """A tiny stand-in for the engine's block manager: shuffled, non-contiguous blocks."""

    def __init__(self, model, num_blocks: int = 96, block_size: int = 4, seed: int = 0):
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.kv = [
            (torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype))
            for _ in range(model.num_layers)
        ]
        self.block_size = block_size
        self.free = list(range(1, num_blocks))  # block 0 stays unused: padding slots point there
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.sliding_window = model.sliding_window

    def slots(self, seq: int, start: int, end: int) -> torch.Tensor:
        """Slots of positions ``start..end-1`` of ``seq``, allocating blocks on demand."""
        table = self.tables.setdefault(seq, [])
        while len(table) * self.block_size < end:
            table.append(self.free.pop())
        return torch.tensor([table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)])

    def step(self, decodes=(), prefills=()):
        """Inputs of one engine step.

        ``decodes``: ``(seq, token, position)``; ``prefills``: ``(seq, tokens, start_position)``.
        Returns ``(input_ids, positions, meta)`` with the decode tokens first.
        """
        ids, pos, slot_parts = [], [], []
        for seq, token, p in decodes:
            ids.append(token)
            pos.append(p)
            slot_parts.append(self.slots(seq, p, p + 1))
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), sliding_window=self.sliding_window)
        if decodes:
            lens = [p + 1 for _, _, p in decodes]
            max_ctx = max(lens)
            dslots = torch.zeros(len(decodes), max_ctx, dtype=torch.long)
            for i, (seq, _, p) in enumerate(decodes):
                dslots[i, : p + 1] = self.slots(seq, 0, p + 1)
            meta.num_decodes = len(decodes)
            meta.decode_slots = dslots
            meta.decode_ctx_lens = torch.tensor(lens)
        for seq, tokens, start in prefills:
            q_start = len(ids)
            ids.extend(tokens)
            pos.extend(range(start, start + len(tokens)))
            slot_parts.append(self.slots(seq, start, start + len(tokens)))
            end = start + len(tokens)
            ctx_slots = None if start == 0 else self.slots(seq, 0, end)
            meta.prefills.append(PrefillChunk(q_start=q_start, q_end=len(ids), ctx_len=end, ctx_slots=ctx_slots))
        meta.slot_mapping = torch.cat(slot_parts)
        return torch.tensor(ids), torch.tensor(pos), meta

    def run(self, model, decodes=(), prefills=()):
        """Logits ``[T, vocab]`` of one step."""
        ids, pos, meta = self.step(decodes, prefills)
        with torch.inference_mode():
            return model.compute_logits(model(ids, pos, self.kv, meta))


def prompt(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, vocab) for _ in range(n)]


class HFSequence:
    """One sequence run through transformers with its own KV cache."""

    def __init__(self, model):
        self.model = model
        self.past = None

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([tokens]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0].float()


def assert_close(ours, ref, atol=ATOL, what=""):
    diff = (ours - ref).abs().max().item()
    assert diff < atol, f"{what}: max abs diff {diff:.3g} >= {atol}"


# --------------------------------------------------------------------------- the plugin itself


def test_registers_family_and_imports_light():
    import subprocess
    import sys

    code = (
        "import sys; import patchbay_plugins.models.llama as m; "
        "fams = []; m.register_model_families(fams.append); "
        "assert fams[0].name == 'llama' and 'Qwen3ForCausalLM' in fams[0].architectures; "
        "assert fams[0].tasks == frozenset({'generate', 'embed'}); "
        "assert 'torch' not in sys.modules, 'plugin import pulled in torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_interface_attributes(tiny_arch_model):
    arch, model_dir = tiny_arch_model
    model = our_model(model_dir)
    assert isinstance(model, torch.nn.Module)
    assert model.num_layers == 2
    assert model.num_kv_heads == 2
    assert model.head_dim == (32 if arch == "Qwen3ForCausalLM" else 16)
    assert model.vocab_size == 512
    assert model.max_position_embeddings == 2048
    assert model.sliding_window is None  # Mistral's default window (4096) exceeds max positions
    assert model.dtype == torch.float32
    assert model.device == torch.device("cpu")
    assert not any(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- against transformers


def _prefill_and_decode(hf, ours, tokens, steps=6, seed=0):
    """Prefill ``tokens`` then decode ``steps`` greedy tokens (chosen by transformers) in both."""
    cache = PagedCache(ours, seed=seed)
    ref = HFSequence(hf)
    ref_logits = ref(tokens)
    our_logits = cache.run(ours, prefills=[(0, tokens, 0)])
    assert_close(our_logits, ref_logits, what="prefill")
    pos = len(tokens)
    nxt = int(ref_logits[-1].argmax())
    for step in range(steps):
        ref_logits = ref([nxt])
        our_logits = cache.run(ours, decodes=[(0, nxt, pos)])
        assert_close(our_logits, ref_logits, what=f"decode step {step}")
        pos += 1
        nxt = int(ref_logits[-1].argmax())


def test_prefill_and_decode_match_transformers(tiny_arch_model):
    _, model_dir = tiny_arch_model
    _prefill_and_decode(hf_model(model_dir), our_model(model_dir), prompt(11), steps=6)


def test_torch_kernel_paths_match_transformers(tiny_arch_model, monkeypatch):
    """With ``PATCHBAY_NO_CPP_KERNELS=1`` (no compiler, or not a CPU) every op takes its torch
    path: the model still matches transformers."""
    monkeypatch.setenv("PATCHBAY_NO_CPP_KERNELS", "1")
    _, model_dir = tiny_arch_model
    _prefill_and_decode(hf_model(model_dir), our_model(model_dir), prompt(11), steps=4)


def test_batched_decode_of_three_sequences(tiny_arch_model):
    _, model_dir = tiny_arch_model
    hf, ours = hf_model(model_dir), our_model(model_dir)
    prompts = [prompt(n, seed=n) for n in (3, 9, 17)]
    refs = [HFSequence(hf) for _ in prompts]
    cache = PagedCache(ours, seed=1)
    # one step prefills all three (three chunks in one flat batch)
    logits = cache.run(ours, prefills=[(i, p, 0) for i, p in enumerate(prompts)])
    start = 0
    nxt, pos = [], []
    for ref, p in zip(refs, prompts):
        r = ref(p)
        assert_close(logits[start : start + len(p)], r, what="batched prefill")
        start += len(p)
        nxt.append(int(r[-1].argmax()))
        pos.append(len(p))
    for step in range(5):
        logits = cache.run(ours, decodes=[(i, nxt[i], pos[i]) for i in range(3)])
        for i, ref in enumerate(refs):
            r = ref([nxt[i]])
            assert_close(logits[i : i + 1], r, what=f"batched decode step {step} seq {i}")
            nxt[i] = int(r[-1].argmax())
            pos[i] += 1


def test_mixed_decode_and_prefill_step(tiny_llama):
    """Decode rows first, then a prefill chunk, in one step (as the engine batches them)."""
    hf, ours = hf_model(tiny_llama), our_model(tiny_llama)
    a, b = prompt(7, seed=1), prompt(12, seed=2)
    cache = PagedCache(ours, seed=2)
    ref_a, ref_b = HFSequence(hf), HFSequence(hf)
    cache.run(ours, prefills=[(0, a, 0)])
    nxt = int(ref_a(a)[-1].argmax())
    logits = cache.run(ours, decodes=[(0, nxt, len(a))], prefills=[(1, b, 0)])
    assert_close(logits[:1], ref_a([nxt]), what="decode row")
    assert_close(logits[1:], ref_b(b), what="prefill rows")


def test_chunked_prefill_equals_one_shot(tiny_arch_model):
    _, model_dir = tiny_arch_model
    ours = our_model(model_dir)
    tokens = prompt(13, seed=3)
    one_shot = PagedCache(ours, seed=3).run(ours, prefills=[(0, tokens, 0)])
    cache = PagedCache(ours, seed=4)
    parts = []
    for start, end in ((0, 5), (5, 9), (9, 13)):
        parts.append(cache.run(ours, prefills=[(0, tokens[start:end], start)]))
    assert_close(torch.cat(parts), one_shot, what="chunked prefill")
    # and decoding after a chunked prefill continues the same sequence
    nxt = int(one_shot[-1].argmax())
    hf = HFSequence(hf_model(model_dir))
    hf(tokens)
    assert_close(cache.run(ours, decodes=[(0, nxt, 13)]), hf([nxt]), what="decode after chunks")


@pytest.mark.parametrize(
    "variant",
    [
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 500000.0,
            }
        },
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0}},
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
        {"attention_bias": True, "mlp_bias": True, "rms_norm_eps": 1e-5, "head_dim": 32},
    ],
    ids=["rope-linear", "rope-llama3", "rope-yarn", "rope-dynamic", "bias-headdim"],
)
def test_llama_config_variants(tiny_model_factory, variant):
    model_dir = tiny_model_factory("LlamaForCausalLM", **variant)
    _prefill_and_decode(hf_model(model_dir), our_model(model_dir), prompt(9, seed=5), steps=2)


@pytest.mark.parametrize(
    "arch,overrides,expect_window",
    [
        ("MistralForCausalLM", {"sliding_window": 6}, 6),
        # layer 0 full attention, layer 1 sliding: the model windows layer 1 itself
        ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, None),
    ],
    ids=["mistral-all-layers", "qwen2-mixed-layers"],
)
def test_sliding_window(tiny_model_factory, arch, overrides, expect_window):
    model_dir = tiny_model_factory(arch, **overrides)
    ours = our_model(model_dir)
    assert ours.sliding_window == expect_window
    _prefill_and_decode(hf_model(model_dir), ours, prompt(14, seed=6), steps=5)


# --------------------------------------------------------------------------- checkpoints


def test_sharded_checkpoint_loads_identically(tiny_model_factory, tiny_llama):
    sharded = tiny_model_factory("LlamaForCausalLM", shards=3)
    assert len(list(sharded.glob("model-0000?-of-00003.safetensors"))) == 3
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = our_model(tiny_llama), our_model(sharded)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na
    tokens = prompt(8)
    la = PagedCache(a).run(a, prefills=[(0, tokens, 0)])
    lb = PagedCache(b).run(b, prefills=[(0, tokens, 0)])
    assert torch.equal(la, lb)


def test_tied_embeddings(tiny_model_factory):
    model_dir = tiny_model_factory("LlamaForCausalLM", tie_word_embeddings=True)
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    ours = our_model(model_dir)
    assert ours.lm_head is ours.embed_tokens
    _prefill_and_decode(hf_model(model_dir), ours, prompt(10, seed=7), steps=3)


def test_bfloat16_close_to_transformers(tiny_arch_model):
    _, model_dir = tiny_arch_model
    hf = hf_model(model_dir, torch.bfloat16)
    ours = our_model(model_dir, torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.embed_tokens.dtype == torch.bfloat16
    tokens = prompt(16, seed=8)
    cache = PagedCache(ours)
    assert cache.kv[0][0].dtype == torch.bfloat16
    ref = HFSequence(hf)
    rows_ours = [cache.run(ours, prefills=[(0, tokens, 0)])]
    rows_ref = [ref(tokens)]
    assert rows_ours[0].dtype == torch.float32
    pos, nxt = len(tokens), int(rows_ref[0][-1].argmax())
    for _ in range(4):
        rows_ref.append(ref([nxt]))
        rows_ours.append(cache.run(ours, decodes=[(0, nxt, pos)]))
        pos, nxt = pos + 1, int(rows_ref[-1][-1].argmax())
    o, r = torch.cat(rows_ours), torch.cat(rows_ref)
    rel = (o - r).abs().max() / r.abs().max()
    assert rel < 5e-2, f"bf16 relative max diff {rel:.3g}"
    agree = (o.argmax(-1) == r.argmax(-1)).float().mean()
    assert agree >= 0.8, f"bf16 argmax agreement {agree:.2f}"


def test_missing_and_unexpected_weights_are_named(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    state["model.rotary_emb.inv_freq"] = torch.zeros(8)  # old checkpoints carry this: ignored
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError) as exc:
        our_model(broken)
    msg = str(exc.value)
    assert "model.layers.1.mlp.down_proj.weight" in msg and "missing" in msg
    assert "model.layers.1.mlp.extra.weight" in msg and "unexpected" in msg
    assert "inv_freq" not in msg


def test_no_checkpoint_is_a_clear_error(tiny_llama, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_llama / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        our_model(empty)


def test_shape_mismatch_with_config_is_named(tiny_llama, tmp_path):
    import json

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"wrong shapes.*model\.layers\.0\.mlp\.gate_proj\.weight"):
        our_model(broken)
