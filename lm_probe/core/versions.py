"""Schema versions of the folders lm_probe saves.

Saved probes (``probes.json``), geometry bundles and activation-store runs
(``metadata.json``) each record the version of their layout as ``schema_version``
(a folder without one is version 0). A reader takes its own version and older ones;
a newer one was written by a newer lm_probe, whose fields this one could misread, so
:func:`check_schema_version` refuses it with the one message every reader gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["check_schema_version", "__version__"]

__version__ = "0.1.0"  #: lm_probe's version (``lm_probe.__version__``), recorded in every saved folder


def check_schema_version(document: Mapping[str, Any], supported: int, kind: str, path: str | Path) -> None:
    """Refuse a saved document whose ``schema_version`` is newer than this lm_probe reads.

    Args:
        document: The parsed JSON (``probes.json`` or ``metadata.json``).
        supported: The newest schema version the caller reads.
        kind: What the folder holds, for the message (``"probe"``, ``"geometry"``, ``"store"``).
        path: The folder, for the message.

    Raises:
        ValueError: the document's version is above ``supported``.
    """
    found = document.get("schema_version", 0)
    if found > supported:
        raise ValueError(f"{path} was written with {kind} schema {found}; this lm_probe reads up to {supported}: "
                         "upgrade lm_probe to read it")
