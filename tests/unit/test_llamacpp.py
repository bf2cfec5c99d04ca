"""The llama.cpp decoder against torch: the same logits (fp32 GGUF of the tiny model, and a
PPO-style LoRA adapter applied by llama.cpp against the merged torch model), the engine on
it (greedy equals torch's, batched equals single, seeded sampling, hot swap under a stream),
the serving factory's choice of backend, and the embedded Q4_1 GGUF against its fp32
dequantisation.  ``make test`` installs llama-cpp-python (the ``fast`` extra)."""

from __future__ import annotations

import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from assistant import models, serve
from assistant.engine import Engine, SamplingParams, SlotDecoder, gguf, llamacpp
from assistant.holder import ModelHolder
from tests.factories import app_settings, build_tiny_model

IDS = list(range(100, 164))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    return gguf.hf_to_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", models.embedded_gguf_path())


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    return models.load(str(tiny_model_dir), tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA on the tiny model's last layer with large random B (PPO's shape, not its size)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, layers_to_transform=[1]))
    torch.manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter") / "v-1"
    peft.save_pretrained(out)
    return out, peft.merge_and_unload().eval()


def logits_of(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


def test_fp32_gguf_gives_torchs_logits(tiny, tiny_gguf):
    decoder = llamacpp.LlamaCppDecoder(tiny_gguf, 4, 2048, threads=1)
    got, ref = decoder.teacher_forced(IDS), logits_of(tiny.model)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 2e-3 * ref.abs().max()  # fp16 KV cache, else exact
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_lora_adapter_is_applied_like_the_merged_model(tiny, tiny_gguf, adapter, tmp_path):
    adapter_dir, merged = adapter
    lora = gguf.cached_lora_gguf(adapter_dir, tmp_path, n_head=4, n_head_kv=2)
    assert gguf.cached_lora_gguf(adapter_dir, tmp_path, n_head=4, n_head_kv=2) == lora  # converted once
    got, ref, before = llamacpp.LlamaCppDecoder(tiny_gguf, 4, 2048, threads=1, lora=lora).teacher_forced(IDS), \
        logits_of(merged), logits_of(tiny.model)
    changed = (ref - before).abs().max()
    assert changed > 0.5  # the adapter matters ...
    assert (got - ref).abs().max() < 0.01 * changed  # ... and llama.cpp applies it as the merge does


def test_batched_decode_equals_single_and_slots_move(tiny_gguf):
    d = llamacpp.LlamaCppDecoder(tiny_gguf, 4, 2048, threads=1)
    for slot in range(3):
        d.prefill(slot, IDS[:10 + slot])
    batched = d.decode([5, 6, 7])
    d.move(2, 0)  # the engine keeps slots dense: the last one moves into a freed slot
    d.release(1)
    moved = d.decode([8])[0]
    singles = []
    for slot, token in enumerate([5, 6, 7]):
        d.release(0)
        d.prefill(0, IDS[:10 + slot])
        singles.append(d.decode([token])[0])
    assert all(torch.allclose(batched[i], singles[i], atol=2e-3) for i in range(3))
    d.release(0)
    d.prefill(0, IDS[:12])
    d.decode([7])
    assert torch.allclose(moved, d.decode([8])[0], atol=2e-3)


def test_engine_on_llamacpp_matches_torch_greedy_and_keeps_seeds(tiny, tiny_gguf):
    torch_engine = Engine(tiny.model, tiny.tokenizer, stop_ids=set())
    cpp = Engine(tiny.model, tiny.tokenizer, stop_ids=set(),
                 decoder=llamacpp.LlamaCppDecoder(tiny_gguf, 8, 2048, threads=1))
    try:
        ids = cpp.encode_chat([{"role": "user", "content": "Tell me a story about a small cat"}])
        greedy = SamplingParams(temperature=0, max_new_tokens=16)
        assert list(cpp.submit(ids, greedy)) == list(torch_engine.submit(ids, greedy))
        seeded = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=42)
        first = list(cpp.submit(ids, seeded))
        reqs = [cpp.submit(ids, SamplingParams(temperature=1.0, max_new_tokens=12)) for _ in range(3)]
        again = cpp.submit(ids, seeded)
        assert list(again) == first  # a seed reproduces the answer whatever else is in the batch
        for r in reqs:
            assert len(list(r)) == 12
        assert cpp.stats.peak_batch >= 2
    finally:
        torch_engine.close(10)
        cpp.close(10)


def test_hot_swap_to_a_lora_version_keeps_the_stream_on_the_old_weights(tiny, tiny_gguf, adapter, tmp_path):
    adapter_dir, _ = adapter
    lora = gguf.cached_lora_gguf(adapter_dir, tmp_path, n_head=4, n_head_kv=2)
    old = Engine(tiny.model, tiny.tokenizer, stop_ids=set(), decoder=llamacpp.LlamaCppDecoder(tiny_gguf, 4, 2048))
    new = Engine(tiny.model, tiny.tokenizer, stop_ids=set(),
                 decoder=llamacpp.LlamaCppDecoder(tiny_gguf, 4, 2048, lora=lora))
    try:
        ids = old.encode_chat([{"role": "user", "content": "hello"}])
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=24, seed=5)
        old_answer, new_answer = list(old.submit(ids, params)), list(new.submit(ids, params))
        assert old_answer != new_answer
        holder = ModelHolder(old, "sft")
        version, engine, req = holder.submit(ids, params)
        stream = iter(req)
        head = [next(stream) for _ in range(2)]
        started = time.perf_counter()
        holder.swap(new, "v-1")
        assert time.perf_counter() - started < 0.1  # the request path waits on a reference swap only
        assert head + list(stream) == old_answer and version == "sft"
        assert holder.submit(ids, params)[0] == "v-1"
    finally:
        old.close(10)
        new.close(10)


def test_the_factory_picks_llamacpp_where_it_can_and_says_why_not(tmp_path, tiny_model_dir, tiny_gguf, adapter):
    tiny_dir = tmp_path / "tiny-with-gguf"
    build_tiny_model(tiny_dir, tiny_model_dir)
    gguf.hf_to_gguf(tiny_dir, tiny_dir / "model.gguf", models.embedded_gguf_path())
    auto = serve.engine_factory(app_settings(tmp_path, tiny_dir))("sft", str(tiny_dir))
    plain = serve.engine_factory(app_settings(tmp_path, tiny_model_dir))("sft", str(tiny_model_dir))
    forced_torch = serve.engine_factory(app_settings(tmp_path, tiny_dir, backend="torch"))("sft", str(tiny_dir))
    try:
        assert isinstance(auto.decoder, llamacpp.LlamaCppDecoder)
        assert isinstance(plain.decoder, SlotDecoder)  # no GGUF: torch
        assert isinstance(forced_torch.decoder, SlotDecoder)
    finally:
        for engine in (auto, plain, forced_torch):
            engine.close(10)
    with pytest.raises(ValueError, match="no GGUF"):
        serve.engine_factory(app_settings(tmp_path, tiny_model_dir, backend="llamacpp"))("sft", str(tiny_model_dir))
    with pytest.raises(ValueError, match="--backend must be"):
        serve.engine_factory(app_settings(tmp_path, tiny_dir, backend="fastest"))("sft", str(tiny_dir))


@pytest.mark.slow
def test_embedded_model_is_served_exactly_from_an_fp16_gguf(embedded_model_dir, tmp_path):
    """The embedded model is served from an fp16 GGUF of its fp32 weights (the dequantised
    Q4_1), which holds them exactly: llama.cpp agrees with torch on every teacher-forced token
    (benchmarks/quant_quality.py measures it on held-out text)."""
    loaded = models.load(str(embedded_model_dir), tmp_path)
    served = gguf.serving_gguf(embedded_model_dir, tmp_path)
    assert served.name == "smollm2-135m-instruct-f16.gguf" and gguf.serving_gguf(embedded_model_dir, tmp_path) == served
    d = llamacpp.LlamaCppDecoder(served, 2, 8192, threads=2)
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain what a hash table is."},
         {"role": "assistant", "content": "A hash table maps keys to values using a hash function that picks a "
                                          "bucket for each key, so a lookup takes constant time on average."}],
        tokenize=True, return_dict=True)["input_ids"]
    ref, got = logits_of(loaded.model, text), d.teacher_forced(text)
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    agreement = (ref.argmax(-1) == got.argmax(-1)).float().mean()
    assert kl < 1e-3 and agreement == 1.0, (float(kl), float(agreement))
