"""The retrain's samplers (``retrain.rollout``): llama.cpp samples what torch samples (greedy,
with answers ending at different steps), follows a PPO policy's adapter as it trains, samples
a published version with its adapter, reproduces a seed; ``make_sampler`` chooses as the server
does; PPO runs on it end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from assistant import models
from assistant.engine import gguf
from retrain.backbone import prompt_ids
from retrain.job import run_ppo
from retrain.ppo import PPOConfig
from retrain.rollout import LlamaCppSampler, TorchSampler, make_sampler
from tests.factories import build_tiny_model, separable_pairs, tiny_reward_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["hi", "a much longer question with many more words in it", "tell me a story", "why is the sky blue"]


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with an fp32 GGUF of itself in its directory (what llama.cpp serves)."""
    out = tmp_path_factory.mktemp("tiny-with-gguf") / "tiny"
    build_tiny_model(out, tiny_model_dir)
    gguf.hf_to_gguf(out, out / "model.gguf", models.embedded_gguf_path())
    return out


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return models.load(str(tiny_dir), tiny_dir.parent, device="cpu", dtype="float32")


def encoded(tok, questions=QUESTIONS):
    return [prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]


def draw(sampler, tok, prompts, *, stop_ids=frozenset({-1}), temperature=0.0, n=10, seed=0):
    return sampler.sample(prompts, max_new_tokens=n, temperature=temperature, top_p=1.0, stop_ids=set(stop_ids),
                          pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed))


def llama(loaded):
    cfg = loaded.model.config
    return LlamaCppSampler(Path(loaded.path) / "model.gguf", cfg.num_attention_heads, cfg.num_key_value_heads, threads=1)


def random_lora(model, seed: int):
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, layers_to_transform=[1]))
    shake(peft, seed)
    return peft.eval()


def shake(peft, seed: int) -> None:
    """Random LoRA matrices, B large (what a PPO step changes, much bigger)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "lora_B" in name else 0.2))


def assert_same_greedy(want, got, model, tol: float = 4e-3) -> None:
    """``got`` (llama.cpp) samples what ``want`` (torch) does, greedy: the same prompts, masks
    and tokens, except where torch's two best logits are within ``tol`` x the largest logit of
    each other (twice the logit error of test_llamacpp's fp32 check: llama.cpp's KV cache is
    fp16, and CPUs round differently): from there on a row may go
    its own way, and its tokens are not compared further."""
    (ids, pmask, resp, rmask), (g_ids, g_pmask, g_resp, g_rmask) = want, got
    assert torch.equal(ids, g_ids) and torch.equal(pmask, g_pmask)
    for i in range(len(resp)):
        prompt = ids[i][pmask[i].bool()].tolist()
        for t in range(resp.shape[1]):
            a, b = int(resp[i, t]), int(g_resp[i, t]) if t < g_resp.shape[1] else -1
            if a != b:
                with torch.no_grad():
                    logits = model(torch.tensor([prompt + resp[i, :t].tolist()])).logits[0, -1]
                assert b >= 0 and logits.max() - logits[b] < tol * logits.abs().max(), (i, t, a, b)
                break
            assert rmask[i, t] == g_rmask[i, t]
            if not rmask[i, t]:
                break


def test_llamacpp_samples_what_torch_samples_with_answers_ending_at_different_steps(tiny_dir):
    policy = random_lora(models.load(str(tiny_dir), tiny_dir.parent, device="cpu", dtype="float32").model, 1)
    tok = models.load_tokenizer(tiny_dir)
    prompts = encoded(tok)
    _, _, free, _ = draw(TorchSampler(policy), tok, prompts)
    # a stop token that ends the first answer where it first says it, and not all the others
    stop = next({t} for t in free[0].tolist() if not all(t in row for row in free[1:].tolist()))
    want = draw(TorchSampler(policy), tok, prompts, stop_ids=stop)
    cfg = policy.config
    sampler = LlamaCppSampler(tiny_dir / "model.gguf", cfg.num_attention_heads, cfg.num_key_value_heads,
                              threads=1).follow(policy)
    try:
        got = draw(sampler, tok, prompts, stop_ids=stop)
    finally:
        sampler.close()
    assert_same_greedy(want, got, policy)
    lengths = want[3].sum(-1)
    assert lengths.max() == 10 and lengths.min() < 10  # answers of uneven lengths, padded and masked


def test_it_follows_the_policy_adapter_as_ppo_changes_it(tiny_dir):
    policy = random_lora(models.load(str(tiny_dir), tiny_dir.parent, device="cpu", dtype="float32").model, 1)
    tok = models.load_tokenizer(tiny_dir)
    cfg = policy.config
    sampler = LlamaCppSampler(tiny_dir / "model.gguf", cfg.num_attention_heads, cfg.num_key_value_heads,
                              threads=1).follow(policy)
    prompts = encoded(tok)
    try:
        before = draw(sampler, tok, prompts)
        assert_same_greedy(draw(TorchSampler(policy), tok, prompts), before, policy)
        shake(policy, 2)  # an optimiser step, in place
        after = draw(sampler, tok, prompts)
        assert_same_greedy(draw(TorchSampler(policy), tok, prompts), after, policy)
        assert not torch.equal(before[2], after[2])
        assert sampler.sync_s > 0
    finally:
        sampler.close()


def test_a_published_version_is_sampled_with_its_adapter(loaded, tiny_dir, tmp_path):
    peft = random_lora(models.load(str(tiny_dir), tiny_dir.parent, device="cpu", dtype="float32").model, 3)
    peft.peft_config["default"].base_model_name_or_path = str(tiny_dir)
    peft.save_pretrained(tmp_path / "v-1")
    version = models.load(str(tmp_path / "v-1"), tmp_path, device="cpu", dtype="float32")  # merged
    tok = loaded.tokenizer
    prompts = encoded(tok)
    sampler = llama(loaded)
    try:
        got = draw(sampler.use_version(version.path, tmp_path / "gguf"), tok, prompts)
        assert_same_greedy(draw(TorchSampler(version.model), tok, prompts), got, version.model)
        base = draw(sampler.use_version(loaded.path, tmp_path / "gguf"), tok, prompts)  # no adapter
        assert_same_greedy(draw(TorchSampler(loaded.model), tok, prompts), base, loaded.model)
        assert not torch.equal(got[2], base[2])
    finally:
        sampler.close()


def test_a_seed_reproduces_the_rollouts(loaded):
    tok = loaded.tokenizer
    sampler = llama(loaded)
    prompts = encoded(tok)
    try:
        a = draw(sampler, tok, prompts, temperature=1.0, n=12, seed=7)[2]
        b = draw(sampler, tok, prompts, temperature=1.0, n=12, seed=7)[2]
        c = draw(sampler, tok, prompts, temperature=1.0, n=12, seed=8)[2]
    finally:
        sampler.close()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_make_sampler_chooses_as_the_server_does(loaded, tiny_model_dir, tmp_path):
    plain = models.load(str(tiny_model_dir), tmp_path, device="cpu")
    chosen = make_sampler("auto", loaded.path, loaded.model, tmp_path)
    try:
        assert isinstance(chosen, LlamaCppSampler)
    finally:
        chosen.close()
    assert make_sampler("auto", plain.path, plain.model, tmp_path) is None  # no GGUF: torch
    assert make_sampler("torch", loaded.path, loaded.model, tmp_path) is None
    with pytest.raises(ValueError, match="no GGUF"):
        make_sampler("llamacpp", plain.path, plain.model, tmp_path)
    with pytest.raises(ValueError, match="must be auto, llamacpp or torch"):
        make_sampler("fastest", loaded.path, loaded.model, tmp_path)


@pytest.mark.timeout(400)
def test_ppo_samples_its_rollouts_on_llamacpp(tiny_dir, tmp_path):
    tiny_reward_model(tiny_dir, tmp_path / "rm")
    plan = {"policy_path": str(tiny_dir), "ref_path": str(tiny_dir), "reward_path": str(tmp_path / "rm"),
            "prompts": [p.prompt for p in separable_pairs(6)], "out_dir": str(tmp_path / "policy"),
            "ptx_pairs": None, "sampler": "llamacpp", "gguf_dir": str(tmp_path / "gguf")}
    cfg = PPOConfig(steps=2, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=8, lora_layers=1,
                    temperature=0.7)
    res = run_ppo(plan, cfg)
    assert res.steps == 2 and res.sampler == "llamacpp" and 0 < res.sample_s < res.wall_s
    assert 0 < res.final["response_length"] <= 8
    assert (tmp_path / "policy" / "adapter_model.safetensors").exists()
