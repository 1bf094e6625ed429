"""W&B stays offline unless configured; the resolved config and model size reach the logger."""

from __future__ import annotations

import pytest

from piip.run.config import wandb_offline


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_offline_without_configuration(clean_env):
    assert wandb_offline()


def test_online_with_api_key_or_login(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not wandb_offline()
    monkeypatch.delenv("WANDB_API_KEY")
    (clean_env / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    (clean_env / ".netrc").chmod(0o600)
    assert not wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")  # an explicit choice wins
    assert wandb_offline()
