"""One ``RetrainConfig`` for a whole run: typed stage configs, each field documented.

Set any field from JSON (``--retrain-config FILE.json``, sections ``data``, ``labels``,
``reward``, ``ppo``, ``gate``, plus the top-level fields) or on the command line of
``python -m retrain run`` as ``--SECTION.FIELD VALUE`` (``--ppo.lr 1e-4``,
``--gate.kl_budget 15``, ``--min_pairs 16``); the command line wins.  Sampling settings left
at None (rollout and gate temperature, top-p, answer cap) follow the app's settings
(``--temperature``, ``--top-p``, ``--max-new-tokens``), defined once in
``assistant.settings``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrain.data import LabelConfig
from retrain.gate import GateConfig
from retrain.ppo import PPOConfig
from retrain.reward import RewardConfig


@dataclass
class DataConfig:
    heldout_fraction: float = 0.2
    """Share of the labelled judgements held out (the newest, by time)."""
    split: str = "time"
    """Held-out split: 'time' (newest items) or 'session' (a stable hash of the session)."""
    max_prompts_per_session: int = 20
    """Rollout prompts taken from one session at most (its most recent)."""
    min_seed_prompts: int = 64
    """Shipped seed prompts top up the rollout prompts to at least this many."""
    min_heldout_prompts: int = 24
    """Shipped held-out seed prompts top up the gate's prompts to at least this many."""
    include_thumbs: bool = True
    """Use thumbs up/down as unpaired labels (and up/down pairs)."""
    max_reference: int = 256
    """Logged answers of the reference (SFT) model used for the reward normalisation."""
    max_client_share: float = 0.25
    """Most of a run's judgements one client (address) or browser key keeps; its earliest are
    kept, the rest dropped and counted in the ledger.  1 turns the cap off."""
    min_per_client: int = 50
    """A client keeps at least this many judgements whatever its share (one or two clients
    are never capped: there is no crowd to outweigh)."""


@dataclass
class RetrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    """What the snapshot takes from the feedback log."""
    labels: LabelConfig = field(default_factory=LabelConfig)
    """How much each kind of judgement weighs."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Both cross-fitted reward models."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """The policy optimisation."""
    gate: GateConfig = field(default_factory=GateConfig)
    """The offline promotion gate."""
    min_pairs: int = 8
    """Fewer decisive training pairs than this: the run is rejected without training."""
    sampler: str | None = None
    """Where PPO's rollouts and the gate's answers are sampled: 'llamacpp', 'torch' or 'auto'
    (llama.cpp on a CPU when it can, ``retrain.rollout``); None: the app's --backend."""

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> RetrainConfig:
        """Defaults, then the JSON file, then ``overrides`` ("section.field=value")."""
        raw = json.loads(Path(path).read_text()) if path else {}
        cfg = from_dict(cls, raw, where=str(path or "config"))
        for item in overrides or []:
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r}: use section.field=value")
            cfg.set(name.lstrip("-"), value)
        return cfg

    def set(self, dotted: str, value: str) -> None:
        """Sets ``section.field`` (or a top-level field) from a string, converted to its type."""
        *path, name = dotted.replace("-", "_").split(".")
        obj: Any = self
        for part in path:
            if not dataclasses.is_dataclass(getattr(obj, part, None)):
                raise ValueError(f"unknown config section {part!r} in {dotted!r}")
            obj = getattr(obj, part)
        hints = typing.get_type_hints(type(obj))
        if name not in hints or dataclasses.is_dataclass(getattr(obj, name)):
            raise ValueError(f"unknown config field {dotted!r}")
        setattr(obj, name, _convert(value, hints[name], dotted))

    def with_app_settings(self, settings) -> RetrainConfig:
        """Fills the sampling fields left at None from the app's settings."""
        for stage in (self.ppo, self.gate):
            if stage.temperature is None:
                stage.temperature = settings.temperature
            if stage.max_new_tokens is None:
                stage.max_new_tokens = settings.max_new_tokens
        if self.gate.top_p is None:
            self.gate.top_p = settings.top_p
        if self.sampler is None:
            self.sampler = settings.backend
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_dict(cls: type, raw: dict, where: str = "config") -> Any:
    """A dataclass from a dict, recursing into nested dataclass fields; unknown keys are errors."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} fields {sorted(unknown)}")
    kwargs = {}
    for key, value in raw.items():
        hint = hints[key]
        kwargs[key] = from_dict(hint, value, f"{where}.{key}") if dataclasses.is_dataclass(hint) else value
    return cls(**kwargs)


def _convert(text: str, hint: Any, name: str) -> Any:
    """A command-line string as ``hint`` (bool, int, float, str, or ``X | None``)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if type(None) in options and text.lower() in ("none", "null", ""):
        return None
    for t in (o for o in options if o is not type(None)):
        if t is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            continue
        try:
            return t(text)
        except (TypeError, ValueError):
            continue
    raise ValueError(f"--{name}: cannot read {text!r} as {hint}")


def cli_overrides(extra: list[str]) -> list[str]:
    """``["--ppo.lr", "1e-4", "--gate.z=2"]`` -> ``["ppo.lr=1e-4", "gate.z=2"]``."""
    out, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}")
        if "=" in arg:
            out.append(arg[2:])
            i += 1
        elif i + 1 < len(extra):
            out.append(f"{arg[2:]}={extra[i + 1]}")
            i += 2
        else:
            raise ValueError(f"{arg} needs a value")
    return out
