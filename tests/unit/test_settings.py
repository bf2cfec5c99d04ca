"""Settings: CLI beats environment beats default; every field a flag and an env var."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from assistant import settings as st
from assistant.settings import Settings


def parse(argv, env):
    parser = argparse.ArgumentParser()
    st.add_arguments(parser)
    return st.from_namespace(parser.parse_args(argv), env=env)


def test_precedence_cli_env_default():
    assert parse([], {}).port == 7860
    assert parse([], {"ASSISTANT_PORT": "8000"}).port == 8000
    assert parse(["--port", "9000"], {"ASSISTANT_PORT": "8000"}).port == 9000
    s = parse(["--temperature", "0.2"], {"ASSISTANT_TOP_P": "0.5", "ASSISTANT_SYSTEM_PROMPT": "Be brief."})
    assert (s.temperature, s.top_p, s.system_prompt) == (0.2, 0.5, "Be brief.")


def test_defaults():
    s = Settings()
    assert s.host == "127.0.0.1" and s.data_dir == "data" and s.model == "embedded"
    assert s.db_path == Path("data") / "feedback.sqlite"


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("Yes", True), ("on", True),
                                         ("0", False), ("false", False), ("no", False), ("off", False)])
def test_bool_from_env(text, value):
    assert parse([], {"ASSISTANT_SCRUB_PII": text}).scrub_pii is value


def test_bool_flags_and_bad_values():
    assert parse(["--no-retrain-enabled"], {"ASSISTANT_RETRAIN_ENABLED": "1"}).retrain_enabled is False
    assert parse(["--scrub-pii"], {"ASSISTANT_SCRUB_PII": "0"}).scrub_pii is True
    with pytest.raises(SystemExit, match="ASSISTANT_SCRUB_PII"):
        parse([], {"ASSISTANT_SCRUB_PII": "maybe"})
    with pytest.raises(SystemExit, match="ASSISTANT_PORT"):
        parse([], {"ASSISTANT_PORT": "eighty"})


def test_app_help_lists_every_setting():
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=root, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    for f in fields(Settings):
        assert "--" + f.name.replace("_", "-") in out, f.name
        assert st.env_name(f.name) in out, f.name
