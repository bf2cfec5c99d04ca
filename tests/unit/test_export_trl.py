"""The TRL export is accepted unchanged by trl.RewardTrainer (1-2 steps on the tiny model)."""

from __future__ import annotations

import json

import pytest

from retrain.data import Pair
from retrain.export import export_trl_jsonl


def _pairs(n=4):
    sys = {"role": "system", "content": "You are a helpful AI assistant."}
    return [Pair(f"id{i}", "s", f"2024-01-0{i + 1}", [sys, {"role": "user", "content": f"question {i}?"}],
                 f"short {i}", f"a much longer answer number {i}", "regenerate") for i in range(n)]


def test_export_format(tmp_path):
    path = tmp_path / "pairs.jsonl"
    assert export_trl_jsonl(_pairs(2), path) == 2
    rec = json.loads(path.read_text().splitlines()[0])
    assert rec["prompt"][0]["role"] == "system" and rec["prompt"][-1]["role"] == "user"
    assert rec["chosen"] == [{"role": "assistant", "content": "short 0"}]
    assert rec["rejected"] == [{"role": "assistant", "content": "a much longer answer number 0"}]


@pytest.mark.timeout(300)
def test_trl_reward_trainer_accepts_export(tmp_path, tiny_model_dir):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path / "pairs.jsonl"
    export_trl_jsonl(_pairs(4), path)
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    args = trl.RewardConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                            report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                            dataloader_num_workers=0)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    out = trainer.train()
    assert out.global_step == 2
