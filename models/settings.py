"""Environment settings: the only place modelfleet reads its environment variables (prefix MODELFLEET_).

In the ground floor (`models/`), beside the model cache it locates, so that every layer above can read it and
`models/` imports neither `deployments/` nor `cluster/`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Machine-level settings; config files own everything about models and routing."""

    model_config = SettingsConfigDict(env_prefix="MODELFLEET_", extra="ignore")

    home: Path = Field(
        Path.home() / ".modelfleet",
        description="Where the local cluster keeps its state file and Ray temp folder.",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "modelfleet",
        description="Where packaged models are converted and tiny test models are built.",
    )


def get_settings() -> Settings:
    """Read the settings from the environment now (cheap; not cached so tests can change env)."""
    return Settings()
