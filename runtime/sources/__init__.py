"""Frame sources: one interface (base.py) over backends that register themselves, one module each.

A new backend is a module holding its config class (a ``SourceSection`` with ``kind: Literal["name"]``) and the
function that opens it, decorated with ``@register(TheConfig)``, plus its import line below: the run config's
``source:`` union, ``open_source`` and everything behind them find it in the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Union

from pydantic import Field

from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.sources import folder, gstreamer, opencv  # noqa: F401  each registers its backend
from patchline.runtime.sources.base import BACKENDS, FrameSource, SourceContext

# The run config's `source:` section: one member per registered backend, told apart by `kind` (`Union[...]` of a
# tuple: the members are known only once the backends above have registered).
SourceConfig = Annotated[Union[tuple(entry.config for entry in BACKENDS.values())], Field(discriminator="kind")]


def open_source(config: SourceConfig, memory: Path | None = None, disk: DiskWrites | None = None) -> FrameSource:
    """The configured source, checked (raises SourceConfigError) but not yet opened.

    ``memory``: where a folder source remembers the files it inspected (the daemon's state directory);
    ``disk`` counts the writes to it that fail.
    """
    backend = BACKENDS[config.kind].open(config, SourceContext(memory, disk))
    return FrameSource(backend, config)
