"""What :class:`~lm_probe.consumers.geometry.Geometry` computes, and its saved bundle.

A :class:`GeometryResults` holds plain tables and arrays. :func:`save_results` writes it
as a folder of ``metrics.csv``, ``novelty.csv``, ``normalization_ablation.csv``,
``eigenvalues.npz`` and ``metadata.json`` (no pickle); :func:`load_results` reads one
back, refusing a newer schema version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.versions import check_schema_version

__all__ = ["GeometryResults", "SCHEMA_VERSION", "save_results", "load_results"]

SCHEMA_VERSION = 1  #: the layout of a saved bundle (see :mod:`lm_probe.core.versions`)


@dataclass
class GeometryResults:
    """What :meth:`Geometry.compute <lm_probe.consumers.geometry.Geometry.compute>` returns and
    :meth:`Geometry.load <lm_probe.consumers.geometry.Geometry.load>` reads back.

    Attributes:
        metrics: One row per site: rows seen, spectrum and sample metrics, ``reason``
            (why values are NaN, empty otherwise).
        novelty: One row per consecutive pair of sites: ``linear_cka``,
            ``layer_cosine_sim``, ``feature_subspace_novelty``.
        eigenvalues: ``{site: descending float64 covariance eigenvalues}``.
        normalization_ablation: Spectrum metrics of each site's sample under each
            normalization (``raw``, ``token_l2``, ``token_rms``, ``feature_standardized``).
        metadata: Run description (schema version, model, sites, counts, seeds, versions).
    """

    metrics: pd.DataFrame
    novelty: pd.DataFrame
    eigenvalues: dict[str, np.ndarray]
    normalization_ablation: pd.DataFrame
    metadata: dict[str, Any] = field(default_factory=dict)


def save_results(results: GeometryResults, path: str | Path) -> Path:
    """Write a :class:`GeometryResults` bundle (see :meth:`Geometry.save`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    results.metrics.to_csv(path / "metrics.csv")
    results.novelty.to_csv(path / "novelty.csv", index=False)
    results.normalization_ablation.to_csv(path / "normalization_ablation.csv", index=False)
    sites = results.metadata["sites"]
    np.savez(path / "eigenvalues.npz", **{f"s{sites.index(s)}": v for s, v in results.eigenvalues.items()})
    (path / "metadata.json").write_text(json.dumps(results.metadata, indent=2, default=str))
    return path


def load_results(path: str | Path) -> GeometryResults:
    """Read a bundle written by :func:`save_results`.

    Raises:
        ValueError: the bundle's schema version is newer than this lm_probe reads.
    """
    path = Path(path)
    metadata = json.loads((path / "metadata.json").read_text())
    check_schema_version(metadata, SCHEMA_VERSION, "geometry", path)
    with np.load(path / "eigenvalues.npz") as npz:
        eigen = {metadata["sites"][int(k[1:])]: npz[k] for k in npz.files}
    return GeometryResults(
        metrics=_with_reasons(pd.read_csv(path / "metrics.csv", index_col="site")),
        novelty=_with_reasons(pd.read_csv(path / "novelty.csv")),
        eigenvalues=eigen,
        normalization_ablation=pd.read_csv(path / "normalization_ablation.csv"),
        metadata=metadata,
    )


def _with_reasons(frame: pd.DataFrame) -> pd.DataFrame:
    """CSV reads an empty ``reason`` back as NaN; restore the empty strings."""
    frame["reason"] = ["" if pd.isna(v) else str(v) for v in frame["reason"]]
    return frame
