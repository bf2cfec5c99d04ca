"""Model resolution and loading: local directories, PEFT adapters on a base, clear errors."""

from __future__ import annotations

import pytest
import torch

from assistant import models


def test_resolve_local_dir_and_hub_id(tiny_model_dir, tmp_path):
    assert models.resolve(str(tiny_model_dir), tmp_path) == str(tiny_model_dir)
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_resolve_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory ./no-such-model does not exist"):
        models.resolve("./no-such-model", tmp_path)
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        models.resolve(str(tmp_path / "file.bin"), tmp_path)
    with pytest.raises(ValueError, match="unknown dtype"):
        models.pick_dtype("float8", torch.device("cpu"))


def _adapter(tiny_model_dir, path, base_name: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero update, so the adapter visibly changes the model
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(path)
    return path


def test_adapter_loads_on_its_base(tiny_model_dir, tmp_path):
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", str(tiny_model_dir))
    loaded = models.load(str(adapter), tmp_path / "models")
    base = models.load(str(tiny_model_dir), tmp_path / "models")
    assert not hasattr(loaded.model, "peft_config")  # merged for serving
    assert loaded.tokenizer.eos_token == base.tokenizer.eos_token
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        diff = (loaded.model(ids).logits - base.model(ids).logits).abs().max()
    assert diff > 1e-4
    assert not loaded.model.training


def test_adapter_base_given_separately_or_missing(tiny_model_dir, tmp_path):
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", "")
    with pytest.raises(ValueError, match="names no base model: pass --base-model"):
        models.load(str(adapter), tmp_path / "models")
    loaded = models.load(str(adapter), tmp_path / "models", base_model=str(tiny_model_dir))
    assert loaded.path == str(adapter)


def test_stop_ids_include_end_of_turn(tiny_model_dir, tmp_path):
    loaded = models.load(str(tiny_model_dir), tmp_path)
    vocab = loaded.tokenizer.get_vocab()
    assert vocab["<|im_end|>"] in models.stop_token_ids(loaded.model, loaded.tokenizer)
