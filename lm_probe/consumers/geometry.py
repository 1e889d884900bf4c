"""Geometry: streaming covariance spectra and layer-to-layer similarity, on the same trace.

A :class:`Geometry` is a consumer. It reads its sites from the same one trace per batch
as the probes (a site used by both is read once), and keeps, per site, float64 running
moments (count, mean, scatter matrix, merged with Chan's formula), a seeded uniform
sample of rows, and, per consecutive pair of sites, the cross co-moment and
the sum of row cosines. Memory depends on the hidden sizes and ``sample_limit``, never
on the number of tokens. ``compute()`` turns the moments into the metrics of
:mod:`lm_probe.functional.spectra`.

With ``pool="none"`` every real (non-padding) token is a row; with any other pooling
each example is one row. Rows with a non-finite value at any of the sites are counted
and left out (at every site, so rows stay paired).

The sample is a bottom-k sample: each row gets a key that is a seeded hash of its
identity (example id, and token position for ``pool="none"``;
:func:`lm_probe.functional.hashing.hash_uniform`), and the ``sample_limit`` rows with the smallest
keys are kept. Every row is equally likely to be kept, and the sample depends on which
rows were seen, never on their order or batching: a shuffled training epoch and an
in-order ``collect`` of the same examples give the same sample, and two Geometry objects
fed disjoint data merge into exactly the sample of one pass.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from loguru import logger

from ..core.consumer import Consumer, NotComputedError, PooledBatch, RunContext, finite_rows
from ..core.model import model_metadata
from ..core.pooling import check_pool
from ..core.versions import __version__
from ..functional.hashing import hash_uniform
from ..functional.sketch import fd_eigh, fd_shrink
from ..functional.spectra import (SAMPLE_KEYS, SPECTRUM_KEYS, covariance_eigh, linear_cka, normalize_rows,
                                  sample_metrics, spectrum_metrics, subspace_novelty)
from ..functional.stats import comoment_batch, comoment_merge, comoment_update
from .geometry_results import SCHEMA_VERSION, GeometryResults, load_results, save_results

__all__ = ["Geometry"]

NORMALIZATIONS = ("raw", "token_l2", "token_rms", "feature_standardized")


class Geometry(Consumer):
    """Streaming geometry of activations at several sites.

    Args:
        sites: Site strings, e.g. ``[f"model.layers.{i}.output" for i in range(30)]``;
            novelty is reported for consecutive sites in this order.
        pool: ``"none"`` (every real token a row) or a pooling (one row per example).
        sample_limit: Rows kept in the seeded sample for sample metrics.
        novelty_k: Dimension of the top-k covariance subspaces compared by novelty.
        seed: Seed of the sample's keys.
        sketch_rank: Keep a Frequent Directions sketch of this rank instead of the dense
            ``(D, D)`` scatter (for wide models); CKA then comes from the sample.

    Attributes:
        n_rows_: Rows folded in (after excluding non-finite ones).
        n_examples_: Examples seen.
        n_nonfinite_: Rows left out for non-finite values.
    """

    def __init__(self, sites: Sequence[str], *, pool: str = "mean", sample_limit: int = 512,
                 novelty_k: int = 32, seed: int = 0, sketch_rank: int | None = None) -> None:
        if isinstance(sites, str) or not sites:
            raise ValueError("sites must be a non-empty list of site strings")
        if len(set(sites)) != len(sites):
            raise ValueError(f"sites are listed twice: {sorted({s for s in sites if list(sites).count(s) > 1})}")
        if sample_limit < 2:
            raise ValueError(f"sample_limit must be at least 2, got {sample_limit}")
        if sketch_rank is not None and sketch_rank < 1:
            raise ValueError(f"sketch_rank must be a positive integer, got {sketch_rank}")
        self.sites, self.pool = list(sites), check_pool(pool)
        self.sample_limit, self.novelty_k, self.seed, self.sketch_rank = sample_limit, novelty_k, seed, sketch_rank
        self.requests = tuple((s, self.pool) for s in self.sites)
        self.pairs = list(zip(self.sites[:-1], self.sites[1:]))
        self.metadata: dict[str, Any] = {}
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget all data."""
        self.n_rows_ = self.n_examples_ = self.n_tokens_ = self.n_nonfinite_ = 0
        self._moments: dict[str, tuple] = {}
        self._sketch: dict[str, np.ndarray] = {}
        self._cross: dict[tuple[str, str], tuple] = {}
        self._cos_sum = dict.fromkeys(self.pairs, 0.0)
        self._sample: dict[str, np.ndarray] = {}
        self._keys = np.zeros(0)  # the sample's keys, ascending; row i of every site's sample
        self._updated = False
        self._result: GeometryResults | None = None
        self._started = time.perf_counter()
        self._runtime = 0.0

    def start(self, context: RunContext) -> None:
        """Record what the runner knows about the model for the metadata."""
        described = model_metadata(context.model)
        if described is not None:
            self.metadata["model"] = described
        self._started = time.perf_counter()

    def update(self, batch: PooledBatch) -> None:
        rows = {s: np.asarray(batch.acts[(s, self.pool)], np.float64) for s in self.sites}
        n_rows = {r.shape[0] for r in rows.values()}
        if len(n_rows) != 1:
            raise ValueError(f"sites gave different row counts {sorted(n_rows)}; rows must pair up")
        by_site = {s: finite_rows(r) for s, r in rows.items()}
        finite = np.logical_and.reduce(list(by_site.values()))
        keys = self._row_keys(batch, len(finite))
        if not finite.all():
            bad = int((~finite).sum())
            self.n_nonfinite_ += bad
            where = [s for s, ok in by_site.items() if not ok.all()]
            logger.warning("Geometry: {} rows with non-finite activations at {} left out (at every site)", bad, where)
            rows, keys = {s: r[finite] for s, r in rows.items()}, keys[finite]
        self.n_examples_ += len(batch.labels) if batch.labels is not None else 0
        self.n_tokens_ += int(np.sum(batch.n_tokens)) if batch.n_tokens is not None else 0
        self._updated, self._result = True, None
        n = next(iter(rows.values())).shape[0]
        if n == 0:
            return
        for s, x in rows.items():
            if self.sketch_rank:
                self._fold_sketch(s, comoment_batch(x, x), x)
            else:
                self._moments[s] = comoment_update(*self._moments.get(s) or _empty(x, x), x, x)
        for a, b in self.pairs:
            if not self.sketch_rank:
                self._cross[(a, b)] = comoment_update(*self._cross.get((a, b)) or _empty(rows[a], rows[b]),
                                                      rows[a], rows[b])
            self._cos_sum[(a, b)] += float(np.sum(_row_cosines(rows[a], rows[b])))
        if len(self._keys) == self.sample_limit:  # full: only rows with a smaller key than the largest enter
            enter = keys < self._keys[-1]
            rows, keys = {s: x[enter] for s, x in rows.items()}, keys[enter]
        if len(keys):
            self._keep_smallest({s: np.vstack([self._sample[s], x]) if s in self._sample else x
                                 for s, x in rows.items()}, np.concatenate([self._keys, keys]))
        self.n_rows_ += n
        self._runtime = time.perf_counter() - self._started

    def _fold_sketch(self, site: str, state: tuple, x: np.ndarray) -> None:
        """Sketch the batch's centered rows plus the rank-one between-batch term (Chan)."""
        n_b, mean_b = state[0], state[1]
        extra = x - mean_b
        if site in self._moments:
            n_a, mean_a = self._moments[site][:2]
            n = n_a + n_b
            extra = np.vstack([extra, np.sqrt(n_a * n_b / n) * (mean_b - mean_a)])
            self._moments[site] = (n, mean_a + (mean_b - mean_a) * n_b / n)
        else:
            self._moments[site] = (n_b, mean_b)
        old = self._sketch.get(site, np.zeros((0, x.shape[1])))
        self._sketch[site] = fd_shrink(np.vstack([old, extra]), self.sketch_rank)

    def _row_keys(self, batch: PooledBatch, n_rows: int) -> np.ndarray:
        """The sample keys of a batch's rows: a seeded hash of (example id, token position)."""
        if batch.example_ids is None and batch.index is None:  # rows identified by their place in the stream
            return hash_uniform(self.seed, self.n_rows_ + self.n_nonfinite_ + np.arange(n_rows), -1)
        ids, positions = batch.row_ids(self.pool == "none")
        if len(ids) != n_rows:
            raise ValueError(f"the batch has {n_rows} rows but identifies {len(ids)}")
        return hash_uniform(self.seed, ids, positions)

    def _keep_smallest(self, rows: dict[str, np.ndarray], keys: np.ndarray) -> None:
        """Keep the ``sample_limit`` rows with the smallest keys, in key order, at every site."""
        order = np.argsort(keys, kind="stable")[: self.sample_limit]
        self._keys = keys[order]
        self._sample = {s: np.asarray(x, np.float64)[order] for s, x in rows.items()}

    def merge(self, other: "Geometry") -> "Geometry":
        """Fold in another Geometry (same settings) that saw disjoint data; returns ``self``."""
        if not isinstance(other, Geometry) or (other.sites, other.pool, other.sample_limit, other.sketch_rank) != (
                self.sites, self.pool, self.sample_limit, self.sketch_rank):
            raise ValueError("can only merge a Geometry with the same sites, pool, sample_limit and sketch_rank")
        for s in self.sites:
            if s not in other._moments:
                continue
            if s not in self._moments:
                self._moments[s] = _copied(other._moments[s])  # updated in place from now on
                if self.sketch_rank:
                    self._sketch[s] = other._sketch[s]
            elif self.sketch_rank:
                (n_a, mean_a), (n_b, mean_b) = self._moments[s], other._moments[s]
                n = n_a + n_b
                between = np.sqrt(n_a * n_b / n) * (mean_b - mean_a)
                self._sketch[s] = fd_shrink(np.vstack([self._sketch[s], other._sketch[s], between]), self.sketch_rank)
                self._moments[s] = (n, mean_a + (mean_b - mean_a) * n_b / n)
            else:
                self._moments[s] = comoment_merge(*self._moments[s], *other._moments[s])
        for pair in self.pairs:
            if pair in other._cross:
                self._cross[pair] = (comoment_merge(*self._cross[pair], *other._cross[pair])
                                     if pair in self._cross else _copied(other._cross[pair]))
            self._cos_sum[pair] += other._cos_sum[pair]
        self._merge_sample(other)
        self.n_rows_ += other.n_rows_
        self.n_examples_ += other.n_examples_
        self.n_tokens_ += other.n_tokens_
        self.n_nonfinite_ += other.n_nonfinite_
        self._updated = self._updated or other._updated
        self._runtime += other._runtime
        self._result = None
        return self

    def _merge_sample(self, other: "Geometry") -> None:
        """The bottom-k sample of the union: the smallest keys of both samples."""
        if not other._sample:
            return
        if not self._sample:
            self._sample, self._keys = {s: v.copy() for s, v in other._sample.items()}, other._keys.copy()
            return
        self._keep_smallest({s: np.vstack([self._sample[s], other._sample[s]]) for s in self.sites},
                            np.concatenate([self._keys, other._keys]))

    # ------------------------------------------------------------------ results
    def compute(self) -> GeometryResults:
        """Metrics from the moments seen so far (cached until the next update)."""
        if not self._updated:
            raise NotComputedError("Geometry has seen no data yet: run runner.collect(...) or fit_probes first")
        if self._result is None:
            self._result = self._compute()
        return self._result

    def _compute(self) -> GeometryResults:
        rows, eigen, ablation = [], {}, []
        for s in self.sites:
            n = self._moments.get(s, (0,))[0]
            dim = self._dim(s)
            row: dict[str, Any] = {"site": s, "n_rows": n, "hidden": dim, "reason": ""}
            sample = self._sample.get(s, np.zeros((0, dim or 0)))
            if n < 2:
                row["reason"] = "no rows (all padding or non-finite)" if n == 0 else "fewer than 2 rows"
                row.update(dict.fromkeys(SPECTRUM_KEYS + SAMPLE_KEYS, np.nan))
                eigen[s] = (np.array([]), np.zeros((dim or 0, 0)))
            else:
                eigen[s] = self._eigh(s)
                row.update(spectrum_metrics(eigen[s][0], dim))
                row.update(sample_metrics(sample))
            rows.append(row)
            for how in NORMALIZATIONS:
                values = (covariance_eigh(_scatter(normalize_rows(sample, how)), sample.shape[0])[0]
                          if sample.shape[0] >= 2 else np.array([]))
                ablation.append({"site": s, "normalization": how, "n_rows": sample.shape[0],
                                 **spectrum_metrics(values, dim)})
        novelty = []
        for a, b in self.pairs:
            n = min(self._moments.get(a, (0,))[0], self._moments.get(b, (0,))[0])
            entry = {"site_a": a, "site_b": b, "n_rows": n, "linear_cka": np.nan, "layer_cosine_sim": np.nan,
                     "feature_subspace_novelty": np.nan, "reason": "" if n >= 2 else "fewer than 2 rows"}
            if n >= 2:
                if self.sketch_rank:
                    xa, xb = self._sample[a], self._sample[b]
                    entry["linear_cka"] = linear_cka(*[_cross(p, q) for p, q in ((xa, xb), (xa, xa), (xb, xb))])
                    entry["reason"] = "linear_cka from the sample (sketch_rank set)"
                else:
                    entry["linear_cka"] = linear_cka(self._cross[(a, b)][3], self._moments[a][3], self._moments[b][3])
                entry["layer_cosine_sim"] = self._cos_sum[(a, b)] / self.n_rows_
                entry["feature_subspace_novelty"] = subspace_novelty(eigen[a][1], eigen[b][1], self.novelty_k)
            novelty.append(entry)
        metadata = {**self._describe(), **self.metadata}
        return GeometryResults(
            metrics=pd.DataFrame(rows).set_index("site"),
            novelty=pd.DataFrame(novelty),
            eigenvalues={s: v[0] for s, v in eigen.items()},
            normalization_ablation=pd.DataFrame(ablation),
            metadata=metadata,
        )

    def _dim(self, site: str) -> int | None:
        if site in self._sample:
            return self._sample[site].shape[1]
        return None

    def _eigh(self, site: str) -> tuple[np.ndarray, np.ndarray]:
        if self.sketch_rank:
            return fd_eigh(self._sketch[site], self._moments[site][0])
        n, _, _, scatter = self._moments[site]
        return covariance_eigh(scatter, n)

    def _describe(self) -> dict[str, Any]:
        versions = {"lm_probe": __version__, "python": platform.python_version(), "numpy": np.__version__}
        for name in ("torch", "transformers", "nnsight"):
            try:
                versions[name] = __import__(name).__version__
            except ImportError:  # optional here: the versions only describe the run
                pass
        return {
            "schema_version": SCHEMA_VERSION, "sites": self.sites, "pool": self.pool,
            "sample_limit": self.sample_limit, "novelty_k": self.novelty_k, "sketch_rank": self.sketch_rank,
            "seed": self.seed, "n_rows": self.n_rows_, "n_examples": self.n_examples_, "n_tokens": self.n_tokens_,
            "n_nonfinite_rows": self.n_nonfinite_, "runtime_s": round(self._runtime, 3), "versions": versions,
        }

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per site (see :class:`GeometryResults`)."""
        return self.compute().metrics

    @property
    def novelty(self) -> pd.DataFrame:
        """One row per consecutive pair of sites."""
        return self.compute().novelty

    @property
    def eigenvalues(self) -> dict[str, np.ndarray]:
        """``{site: descending covariance eigenvalues}``."""
        return self.compute().eigenvalues

    @property
    def sample(self) -> dict[str, np.ndarray]:
        """The paired sample ``{site: (rows, hidden)}``: row ``i`` of every site
        comes from the same example (or token)."""
        return {s: self._sample[s].copy() for s in self.sites if s in self._sample}

    @property
    def normalization_ablation(self) -> pd.DataFrame:
        """Sample spectrum metrics under each normalization."""
        return self.compute().normalization_ablation

    # ------------------------------------------------------------------ artifacts
    def save(self, path: str | Path) -> Path:
        """Write ``metrics.csv``, ``novelty.csv``, ``normalization_ablation.csv``,
        ``eigenvalues.npz`` and ``metadata.json`` into the folder ``path``."""
        return save_results(self.compute(), path)

    @staticmethod
    def load(path: str | Path) -> GeometryResults:
        """Read a bundle written by :meth:`save` (:func:`~lm_probe.consumers.geometry_results.load_results`).

        Raises:
            ValueError: the bundle's schema version is newer than this lm_probe reads.
        """
        return load_results(path)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_result"] = None
        return state


def _row_cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    denom = nx * ny
    return np.divide(np.sum(x * y, axis=1), denom, out=np.zeros(len(x)), where=denom > 0)


def _scatter(x: np.ndarray) -> np.ndarray:
    return comoment_batch(x, x)[3]


def _cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return comoment_batch(x, y)[3]


def _empty(x: np.ndarray, y: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The co-moment state of no rows, for paired rows like ``x``, ``y``."""
    return 0, np.zeros(x.shape[1]), np.zeros(y.shape[1]), np.zeros((x.shape[1], y.shape[1]))


def _copied(state: tuple) -> tuple:
    """A state whose arrays are this consumer's own (another's may be updated in place)."""
    return tuple(np.array(part) if isinstance(part, np.ndarray) else part for part in state)
