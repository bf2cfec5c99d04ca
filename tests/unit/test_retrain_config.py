"""RetrainConfig: typed stage configs from JSON and from ``--SECTION.FIELD VALUE`` options,
sampling settings that follow the app's, and clear errors for unknown or bad values."""

from __future__ import annotations

import dataclasses
import json

import pytest

from assistant.settings import Settings
from retrain.config import RetrainConfig, cli_overrides


def test_json_then_command_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"ppo": {"steps": 32, "beta": 0.1}, "gate": {"kl_budget": 15}, "min_pairs": 4}))
    cfg = RetrainConfig.load(path, cli_overrides(["--ppo.lr", "1e-4", "--ppo.steps=8", "--gate.top_p", "none",
                                                  "--data.include_thumbs", "off", "--labels.tie_weight", "2"]))
    assert cfg.ppo.steps == 8 and cfg.ppo.beta == 0.1 and cfg.ppo.lr == 1e-4  # the command line wins
    assert cfg.gate.kl_budget == 15 and cfg.gate.top_p is None and cfg.min_pairs == 4
    assert cfg.data.include_thumbs is False and cfg.labels.tie_weight == 2.0
    assert isinstance(cfg.ppo.steps, int) and isinstance(cfg.ppo.lr, float)


def test_sampling_follows_the_app_settings():
    cfg = RetrainConfig.load(None, ["ppo.temperature=0.5"]).with_app_settings(
        Settings(temperature=0.9, top_p=0.8, max_new_tokens=100))
    assert cfg.ppo.temperature == 0.5 and cfg.ppo.max_new_tokens == 100  # set stays, unset follows
    assert (cfg.gate.temperature, cfg.gate.top_p, cfg.gate.max_new_tokens) == (0.9, 0.8, 100)


def test_the_sampler_follows_the_apps_backend_unless_set():
    assert RetrainConfig.load(None, []).with_app_settings(Settings(backend="torch")).sampler == "torch"
    assert RetrainConfig.load(None, []).with_app_settings(Settings()).sampler == "auto"
    assert RetrainConfig.load(None, ["sampler=llamacpp"]).with_app_settings(Settings(backend="torch")).sampler \
        == "llamacpp"


@pytest.mark.parametrize("bad, message", [
    (["ppo.nope=1"], "unknown config field"),
    (["nope.lr=1"], "unknown config section"),
    (["ppo.steps=many"], "cannot read"),
    (["ppo.steps"], "section.field=value"),
])
def test_bad_overrides_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        RetrainConfig.load(None, bad)


def test_unknown_json_keys_are_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"ppo": {"stepz": 3}}))
    with pytest.raises(ValueError, match="stepz"):
        RetrainConfig.load(path)


def test_every_field_is_documented():
    """Each field of the nested configs carries a docstring or a comment in its source."""
    import inspect

    nested = [type(getattr(RetrainConfig(), f.name)) for f in dataclasses.fields(RetrainConfig)
              if dataclasses.is_dataclass(getattr(RetrainConfig(), f.name))]
    for cls in [RetrainConfig, *nested]:
        src = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            line = next(ln for ln in src.splitlines() if ln.strip().startswith(f"{f.name}:"))
            after = src.split(line, 1)[1].lstrip().splitlines()[0]
            assert "#" in line or after.startswith('"""'), f"{cls.__name__}.{f.name} has no help text"


def test_cli_rejects_bad_override():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "retrain", "run", "--now", "--ppo.nope", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown config field" in proc.stderr
