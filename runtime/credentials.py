"""Secrets named in a config, never written in it: systemd's LoadCredential files or environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from patchline.runtime.config import ConfigError


def read_credential(name: str, setting: str) -> str:
    """The secret named ``name``: ``$CREDENTIALS_DIRECTORY/<name>`` (systemd LoadCredential) or env var ``<name>``.

    ``setting`` is the config key that names it, for the error (a ConfigError) when it cannot be read.
    """
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{setting} {name!r} must be a plain name (of a file in $CREDENTIALS_DIRECTORY or of an "
                          "environment variable)")
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if folder and (Path(folder) / name).exists():
        path = Path(folder) / name
        try:
            return path.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from exc
    if name in os.environ:
        return os.environ[name]
    where = f"{folder}/{name}" if folder else "$CREDENTIALS_DIRECTORY/" + name + " (CREDENTIALS_DIRECTORY is not set)"
    raise ConfigError(f"{setting} {name!r} not found: neither {where} nor environment variable {name}")
