"""The base of every configuration section, apart from runtime/config.py so that the modules whose config classes
sit beside their code (runtime/sources/) can use it without importing config.py, which imports them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # A typo in a line's config must refuse to start, not fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)
