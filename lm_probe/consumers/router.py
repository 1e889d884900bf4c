"""Mixture-of-experts router statistics: how evenly each MoE layer spreads tokens over experts.

:class:`RouterStats` reads the router logits of each MoE layer (``sites(model, "router")``,
:mod:`lm_probe.core.routers`) on the runner's one trace per batch, one row per real token
(pooling ``"none"``: padding never enters), and recomputes the routing as the model does:
softmax over the experts, the top-k experts by probability. Per layer it reports

* ``load``: each expert's share of the token -> expert assignments (``n_tokens * top_k``
  of them; sums to 1), and ``top1_load``, the share of tokens whose first choice it is;
* ``entropy_bits``: the Shannon entropy of ``load`` in bits (``log2(n_experts)`` when
  perfectly balanced) and ``cv``: its coefficient of variation, ``std(load) / mean(load)``
  with the population standard deviation (0 when balanced);
* ``mean_top1_prob``: the mean over tokens of the largest router probability.

The state is counts and sums, so instances fed disjoint data merge exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from loguru import logger

from ..core.architectures import sites as model_sites
from ..core.consumer import FirstEpochOnly, NotComputedError, PooledBatch, Request, RunContext, finite_rows
from ..core.routers import router_top_k
from ..core.sites import resolve_sites

__all__ = ["RouterStats"]


class RouterStats(FirstEpochOnly):
    """Per-layer expert load, load-balance entropy and CV, and mean top-1 router probability.

    Args:
        sites: Router output sites (``sites(model, "router")``); ``None``: every router of
            the model, found at :meth:`start`.
        top_k: Experts per token; ``None``: the model's (each router's ``top_k``, else
            ``config.num_experts_per_tok``). Needed when the pass has no model.

    Attributes:
        top_k_: ``{site: k}`` used, set by :meth:`start`.
        layers_: ``{site: block index}`` (``None`` when the pass has no model).
        n_nonfinite_: Token rows left out for non-finite logits (at any site).
    """

    def __init__(self, sites: Sequence[str] | None = None, *, top_k: int | None = None) -> None:
        if isinstance(sites, str) or (sites is not None and not sites):
            raise ValueError("sites must be a non-empty list of router output sites, or None for all routers")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        self.sites = None if sites is None else list(dict.fromkeys(sites))
        self.top_k = None if top_k is None else int(top_k)
        self.top_k_: dict[str, int] = {}
        self.layers_: dict[str, int | None] = {}
        self.reset()

    @property
    def requests(self) -> tuple[Request, ...]:
        """Every router site, one row per real token (``"none"``)."""
        return tuple((s, "none") for s in (self.sites or ()))

    def reset(self) -> None:
        """Forget all counts (the sites and top-k found at :meth:`start` stay)."""
        self._state: dict[str, dict[str, np.ndarray | float | int]] = {}
        self.n_nonfinite_ = 0
        self._epoch_over = False

    def start(self, context: RunContext) -> None:
        """Find the routers and their top-k from ``context.model``, before any forward pass.

        Raises:
            ValueError: the model has no routers, a site is not a router, ``top_k`` exceeds
                a router's experts, or there is no model and ``sites`` or ``top_k`` is missing.
        """
        model, self._epoch_over = context.model, False
        if model is None:
            if self.sites is None or self.top_k is None:
                raise ValueError("RouterStats without a model needs both sites= and top_k=")
            self.top_k_ = {s: self.top_k for s in self.sites}
            self.layers_ = {s: None for s in self.sites}
            return
        hf = getattr(model, "_module", model)
        routers = model_sites(hf, "router")
        self.sites = self.sites if self.sites is not None else routers
        resolved = resolve_sites(hf, self.sites)
        canonical = set(routers)
        for spec, site in resolved.items():
            if site.name not in canonical or site.attr != "output":
                raise ValueError(f"RouterStats reads router outputs; {spec!r} is not one. Router sites: {routers}")
        self.top_k_ = {spec: self.top_k or router_top_k(hf, hf.get_submodule(site.path))
                       for spec, site in resolved.items()}
        self.layers_ = {spec: site.layer for spec, site in resolved.items()}
        for spec, site in resolved.items():
            n_experts = hf.get_submodule(site.path).weight.shape[0]
            if self.top_k_[spec] > n_experts:
                raise ValueError(f"top_k={self.top_k_[spec]} exceeds the {n_experts} experts of {spec!r}")

    def update(self, batch: PooledBatch) -> None:
        if not self.top_k_:
            raise RuntimeError("RouterStats.update before start(): call start(RunContext(...)) (collect does)")
        if batch.epoch > 0:
            return
        logits = {spec: np.asarray(batch.acts[(spec, "none")], np.float64) for spec in self.top_k_}
        finite = np.logical_and.reduce([finite_rows(v) for v in logits.values()])
        if not finite.all():  # the non-finite policy: counted, left out at every site
            self.n_nonfinite_ += int((~finite).sum())
            logger.warning("RouterStats: {} token rows with non-finite router logits left out", int((~finite).sum()))
        for spec, rows in logits.items():
            self._fold(spec, rows[finite])

    def _fold(self, spec: str, rows: np.ndarray) -> None:
        k, n_experts = self.top_k_[spec], rows.shape[1]
        if k > n_experts:
            raise ValueError(f"top_k={k} exceeds the {n_experts} experts of {spec!r}")
        probs = torch.softmax(torch.from_numpy(rows), dim=1)
        top = probs.topk(k, dim=1)
        state = self._state.setdefault(spec, {"load": np.zeros(n_experts, np.int64),
                                              "top1": np.zeros(n_experts, np.int64), "p1": 0.0, "n": 0})
        state["load"] += np.bincount(top.indices.reshape(-1).numpy(), minlength=n_experts)
        state["top1"] += np.bincount(top.indices[:, 0].numpy(), minlength=n_experts)
        state["p1"] += float(top.values[:, 0].sum())
        state["n"] += len(rows)

    def merge(self, other: "RouterStats") -> "RouterStats":
        """Add the counts of ``other`` (fed disjoint data); returns ``self``."""
        for spec, theirs in other._state.items():
            mine = self._state.setdefault(spec, {key: (np.zeros_like(v) if isinstance(v, np.ndarray) else 0)
                                                 for key, v in theirs.items()})
            for key in theirs:
                mine[key] = mine[key] + theirs[key]
        self.n_nonfinite_ += other.n_nonfinite_
        return self

    def compute(self) -> pd.DataFrame:
        """One row per router site: ``site, layer, n_tokens, n_experts, top_k, load,
        top1_load, entropy_bits, max_entropy_bits, cv, mean_top1_prob`` (``load`` and
        ``top1_load`` are float64 arrays, one share per expert).

        Raises:
            NotComputedError: no token seen yet.
        """
        if not any(s["n"] for s in self._state.values()):
            raise NotComputedError("RouterStats has seen no tokens: run collect(...) first")
        rows = []
        for spec in self.top_k_:
            state = self._state.get(spec)
            if state is None or not state["n"]:
                continue
            k, counts = self.top_k_[spec], np.asarray(state["load"], np.float64)
            load = counts / counts.sum()
            nonzero = load[load > 0]
            rows.append({
                "site": spec, "layer": self.layers_.get(spec), "n_tokens": int(state["n"]),
                "n_experts": len(load), "top_k": k, "load": load,
                "top1_load": np.asarray(state["top1"], np.float64) / state["n"],
                "entropy_bits": float(-(nonzero * np.log2(nonzero)).sum()),
                "max_entropy_bits": float(np.log2(len(load))),
                "cv": float(load.std() / load.mean()), "mean_top1_prob": float(state["p1"]) / state["n"],
            })
        return pd.DataFrame(rows)
