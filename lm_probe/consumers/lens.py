"""The logit lens: read each layer's residual stream through the model's own readout.

A transformer language model turns the residual stream after its last block into
next-token logits with two modules: a final normalization (GPT-2 ``transformer.ln_f``,
Llama/Mistral/Qwen2/Gemma ``model.norm``, GPT-NeoX ``gpt_neox.final_layer_norm``) and
the unembedding (``lm_head``, ``embed_out``; often tied to the input embedding). The
logit lens applies those same two modules to the residual stream after *earlier*
blocks, showing which tokens each layer already points at.

:class:`LogitLens` is a consumer. Both modules are found from the model's structure,
not from names (:mod:`lm_probe.core.architectures`): the unembedding is
``get_output_embeddings()``; the block stack is the ``ModuleList`` with
``config.num_hidden_layers`` entries; the final norm is the first
norm-like child (``LayerNorm``, ``RMSNorm``, any ``*Norm`` class) registered after that
list in the same parent (or, failing that, the parent's only norm-like child, as in
OPT). The lens *calls* those modules on the pooled activations, so LayerNorm, RMSNorm,
Gemma's ``(1 + weight)`` scaling and tied weights are exactly the model's math; a
config ``final_logit_softcapping`` (Gemma 2) is applied after the unembedding as the
model does.

Every site must be a block output (the residual stream). One position per example is
read, the last real token (pooling ``"last"``) or the first (``"first"``), for all
sites in the same one trace per batch. The model's own final logits are read there
too (the unembedding's output, pooled the same way), so "agreement with the model" is
measured against what the model itself outputs, and the forward runs to the end. The
last block is always read as well: the lens applied to it must reproduce the model's
logits, and :attr:`LogitLens.max_head_error_` records how closely it does (a warning
says when it does not, e.g. for a model with an extra projection before its head).

Memory: per example and site only the top-k token ids, logits and probabilities, the
logit differences of ``token_pairs``, and per site the agreement counts are kept;
full-vocabulary logits live one batch at a time on the model's device.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from loguru import logger

from ..core.architectures import find_blocks, find_final_norm, find_unembedding
from ..core.consumer import FirstEpochOnly, NotComputedError, PooledBatch, Request, RunContext, finite_rows
from ..core.sites import resolve_sites

__all__ = ["LogitLens", "lens_logits"]

POSITIONS = ("last", "first")


# ---------------------------------------------------------------------- readout
def _text_config(module: torch.nn.Module) -> Any:
    config = getattr(module, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lens_logits(hidden: torch.Tensor, norm: torch.nn.Module, head: torch.nn.Module) -> torch.Tensor:
    """The model's readout of residual-stream rows: ``head(norm(hidden))``.

    Computed without gradients in the head's dtype and on each module's device, as the
    model computes its own logits (no softcapping here).

    Args:
        hidden: ``(rows, hidden)`` residual-stream activations.
        norm: The final normalization module.
        head: The unembedding module.

    Returns:
        ``(rows, vocab)`` float32 logits.
    """
    weight = next(head.parameters())
    norm_param = next(norm.parameters(), weight)
    with torch.no_grad():
        normed = norm(hidden.to(device=norm_param.device, dtype=weight.dtype))
        return head(normed.to(weight.device)).float()


# ---------------------------------------------------------------------- consumer
class LogitLens(FirstEpochOnly):
    """Top-k tokens, logit differences and agreement of the logit lens at block outputs.

    Args:
        sites: Block-output site strings, e.g. ``[f"model.layers.{i}.output" for i in range(L)]``.
        position: ``"last"`` (last real token) or ``"first"`` (first real token).
        top_k: Tokens kept per example and site (stored as :attr:`k`; :attr:`top_k`
            is the result table).
        token_pairs: ``(a, b)`` token-id pairs whose logit difference ``a - b`` is kept.
        targets: One target token id per dataset example (indexed by dataset position),
            for agreement with the targets.

    Attributes:
        layers_: ``{site: block index}``, set by :meth:`start`.
        blocks_path_, norm_path_, head_path_: The modules found, set by :meth:`start`.
        vocab_size_: Rows of the unembedding.
        n_examples_: Examples folded in.
        n_nonfinite_: Examples left out for non-finite activations (at any of its sites).
        max_head_error_: Largest ``max|lens(last block) - model logits| / max|model logits|``
            seen (0 for an exact lens).

    Each example is counted once per pass: in ``fit_probes`` the lens reads the first
    epoch only (then :attr:`active` turns ``False``), and ``targets`` are indexed by the
    positions of the pass's data (``fit_probes`` with ``val_size > 0`` passes the
    training set without its validation share, so give targets with ``collect``). A
    second ``collect`` adds to the tables; call :meth:`reset` first for a fresh one.
    """

    def __init__(self, sites: Sequence[str], *, position: str = "last", top_k: int = 5,
                 token_pairs: Sequence[tuple[int, int]] = (), targets: Sequence[int] | None = None) -> None:
        if isinstance(sites, str) or not sites:
            raise ValueError("sites must be a non-empty list of block-output site strings")
        if len(set(sites)) != len(sites):
            raise ValueError(f"sites are listed twice: {sorted({s for s in sites if list(sites).count(s) > 1})}")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        pairs = [tuple(p) for p in token_pairs]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"token_pairs must be (a, b) pairs of token ids, got {list(token_pairs)}")
        self.sites, self.position, self.k = list(sites), position, int(top_k)
        self.token_pairs = [(_token_id(a, "token_pairs"), _token_id(b, "token_pairs")) for a, b in pairs]
        self.targets = None if targets is None else np.array([_token_id(t, "targets") for t in targets], np.int64)
        self._extra: tuple[Request, ...] = ()  # (last block, position), (unembedding, position)
        self._bound: tuple | None = None  # (norm, head, softcap, tokenizer) of the model, never pickled
        self._last = self._head = ""  # site specs of the last block's output and the unembedding's output
        self.layers_: dict[str, int] = {}
        self.reset()

    @property
    def requests(self) -> tuple[Request, ...]:
        """The sites at :attr:`position`; after :meth:`start` also the last block and the head."""
        return tuple((s, self.position) for s in self.sites) + self._extra

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget all data (the model binding stays)."""
        self._chunks: list[dict[str, Any]] = []
        self._counts = {s: np.zeros(3, np.int64) for s in self.sites}  # examples, agree final, agree target
        self._tokens: dict[int, str] = {}
        self.n_examples_ = self.n_nonfinite_ = 0
        self.max_head_error_ = 0.0
        self._warned, self._epoch_over = False, False
        self._result: dict[str, pd.DataFrame] | None = None

    def start(self, context: RunContext) -> None:
        """Find the final norm and unembedding of ``context.model`` and check every input
        against it.

        Raises:
            TypeError: the context has no model.
            ValueError: a site is not a block output, a token id is outside the
                vocabulary, ``top_k`` exceeds it, or ``targets`` does not match
                ``context.data``.
        """
        model, data = context.model, context.data
        if model is None:
            raise TypeError("LogitLens.start needs a model: RunContext(model=...) (the nnsight model, or a Hugging "
                            "Face model)")
        hf = getattr(model, "_module", model)
        blocks, head_path = find_blocks(hf), find_unembedding(hf)
        n_blocks = len(hf.get_submodule(blocks))
        outputs = {f"{blocks}.{i}": i for i in range(n_blocks)}
        self.layers_ = {}
        for spec, site in resolve_sites(hf, self.sites).items():
            if site.attr != "output" or site.path not in outputs:
                valid = [f"'{p}.output'" for p in outputs]
                shown = valid if len(valid) <= 6 else [*valid[:3], "...", *valid[-2:]]
                raise ValueError(
                    f"LogitLens needs residual-stream sites (block outputs); {spec!r} is not one. "
                    f"Valid sites: {', '.join(shown)}"
                )
            self.layers_[spec] = outputs[site.path]
        norm_path = find_final_norm(hf, blocks)
        head = hf.get_submodule(head_path)
        self.blocks_path_, self.norm_path_, self.head_path_ = blocks, norm_path, head_path
        self.vocab_size_ = int(next(head.parameters()).shape[0])
        self._check_vocab(data)
        softcap = getattr(_text_config(hf), "final_logit_softcapping", None)
        self._bound = (hf.get_submodule(norm_path), head, softcap, getattr(model, "tokenizer", None))
        self._last, self._head = f"{blocks}.{n_blocks - 1}.output", f"{head_path}.output"
        self._extra = ((self._last, self.position), (self._head, self.position))
        self._epoch_over = False

    def _check_vocab(self, data: Any) -> None:
        vocab = self.vocab_size_
        if self.k > vocab:
            raise ValueError(f"top_k={self.k} exceeds the vocabulary size {vocab}")
        bad = sorted({t for pair in self.token_pairs for t in pair if t >= vocab})
        if bad:
            raise ValueError(f"token_pairs have token ids {bad} outside the vocabulary (0..{vocab - 1})")
        if self.targets is not None:
            if (self.targets >= vocab).any():
                raise ValueError(f"targets have token ids {sorted(set(self.targets[self.targets >= vocab].tolist()))} "
                                 f"outside the vocabulary (0..{vocab - 1})")
            if data is not None and len(self.targets) != len(data):
                raise ValueError(f"targets has {len(self.targets)} entries but the dataset has {len(data)} "
                                 "examples; give one target token id per example")

    def update(self, batch: PooledBatch) -> None:
        if self._bound is None:
            raise RuntimeError("LogitLens is not bound to a model: call start(RunContext(model=...)) "
                               "(runner.collect(...) does) before update()")
        if batch.epoch > 0:
            return
        norm, head, softcap, tokenizer = self._bound
        weight = next(head.parameters())
        device = weight.device
        acts = {r: batch.acts[r] for r in self.requests}
        n = len(next(iter(acts.values())))
        seen = np.arange(self.n_examples_ + self.n_nonfinite_, self.n_examples_ + self.n_nonfinite_ + n)
        index = seen if batch.index is None else np.asarray(batch.index)[:n]
        finite = np.logical_and.reduce([finite_rows(v) for v in acts.values()])
        if not finite.all():  # the non-finite policy: counted, left out at every site
            self.n_nonfinite_ += int((~finite).sum())
            logger.warning("LogitLens: {} examples with non-finite activations at {} left out", int((~finite).sum()),
                           [r[0] for r, v in acts.items() if not finite_rows(v).all()])
            acts, index = {r: v[finite] for r, v in acts.items()}, index[finite]
            n = int(finite.sum())
        final = torch.as_tensor(acts[(self._head, self.position)]).to(device)
        final_top1 = final.argmax(1)
        target = None
        if self.targets is not None:
            if index.max(initial=-1) >= len(self.targets):
                raise ValueError(f"example {int(index.max())} has no target: targets has {len(self.targets)} entries")
            target = torch.as_tensor(self.targets[index], device=device)
        lens = {spec: lens_logits(torch.as_tensor(acts[(spec, self.position)]), norm, head)
                for spec in dict.fromkeys([*self.sites, self._last])}
        self._check_head(lens[self._last], final, weight.dtype)
        pairs = torch.as_tensor(self.token_pairs, dtype=torch.long, device=device).reshape(-1, 2)
        for spec in self.sites:
            raw = lens[spec]  # ranks and top-1 from the raw logits: softcapping is monotone but can tie in float32
            logits = raw if softcap is None else torch.tanh(raw / softcap) * softcap
            top = raw.topk(self.k, dim=1).indices
            values = logits.gather(1, top)
            log_z = torch.logsumexp(logits.double(), dim=1, keepdim=True)
            top1 = raw.argmax(1)  # as for the model's own top-1 (topk may order exact ties differently)
            self._counts[spec] += [n, int((top1 == final_top1).sum()),
                                   0 if target is None else int((top1 == target).sum())]
            self._chunks.append({
                "site": spec, "example": index, "token_id": top.cpu().numpy(), "logit": values.cpu().numpy(),
                "prob": torch.exp(values.double() - log_z).cpu().numpy(),
                "diff": (logits[:, pairs[:, 0]].double() - logits[:, pairs[:, 1]].double()).cpu().numpy(),
            })
            if tokenizer is not None:
                for t in np.unique(self._chunks[-1]["token_id"]).tolist():
                    if t not in self._tokens:
                        self._tokens[t] = tokenizer.decode([t])
        self.n_examples_ += n
        self._result = None

    def _check_head(self, lens_last: torch.Tensor, final: torch.Tensor, dtype: torch.dtype) -> None:
        """Compare the lens at the last block with the model's own logits (both pre-softcap)."""
        if final.numel() == 0:
            return
        scale = final.abs().max().clamp(min=torch.finfo(torch.float32).tiny)
        error = float((lens_last - final).abs().max() / scale)
        self.max_head_error_ = max(self.max_head_error_, error)
        tol = max(1e-3, 16 * torch.finfo(dtype).eps)
        if error > tol and not self._warned:
            self._warned = True
            logger.warning(
                "LogitLens: the lens at the last block ({}) differs from the model's own logits by {:.3g} "
                "(relative to the largest logit); the model applies more than '{}' and '{}' after its blocks, "
                "so lens values are not the model's own readout",
                self._last, error, self.norm_path_, self.head_path_,
            )

    def merge(self, other: "LogitLens") -> "LogitLens":
        """Fold in another lens (same settings) that saw other examples; returns ``self``."""
        if not isinstance(other, LogitLens) or other._settings() != self._settings():
            raise ValueError("can only merge a LogitLens with the same sites, position, top_k, token_pairs and targets")
        self._chunks += other._chunks
        for spec in self.sites:
            self._counts[spec] += other._counts[spec]
        self._tokens.update(other._tokens)
        self.layers_ = self.layers_ or other.layers_
        self.n_examples_ += other.n_examples_
        self.n_nonfinite_ += other.n_nonfinite_
        self.max_head_error_ = max(self.max_head_error_, other.max_head_error_)
        self._result = None
        return self

    def _settings(self) -> tuple:
        targets = None if self.targets is None else tuple(self.targets.tolist())
        return self.sites, self.position, self.k, self.token_pairs, targets

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the results only: the model's modules and tokenizer stay behind."""
        return {**self.__dict__, "_bound": None}

    # ------------------------------------------------------------------ results
    def compute(self) -> dict[str, pd.DataFrame]:
        """The result tables ``{"top_k", "logit_diff", "agreement"}`` (see the properties)."""
        if not self.n_examples_:
            raise NotComputedError("LogitLens has seen no data yet: run runner.collect(dataset, consumers=[lens])")
        if self._result is None:
            self._result = {"top_k": self._top_k_frame(), "logit_diff": self._diff_frame(),
                            "agreement": self._agreement_frame()}
        return self._result

    @property
    def top_k(self) -> pd.DataFrame:
        """One row per example, site and rank (1 = most likely): ``example, site, layer, rank,
        token_id, token`` (decoded when the model has a tokenizer, else ``None``), ``logit, prob``
        (the full-vocabulary softmax, computed in float64)."""
        return self.compute()["top_k"]

    @property
    def logit_diff(self) -> pd.DataFrame:
        """One row per example, site and pair: ``example, site, layer, pair`` (``"a-b"`` in
        token ids), ``token_a, token_b, logit_diff`` (``logit[a] - logit[b]``)."""
        return self.compute()["logit_diff"]

    @property
    def agreement(self) -> pd.DataFrame:
        """One row per site: ``site, layer, n``; ``n_agree_final, agreement_final``: the lens's
        top-1 equals the model's own top-1 (its final logits); ``n_agree_target,
        agreement_target``: equals ``targets`` (missing without targets). Agreements are
        counts divided by ``n``."""
        return self.compute()["agreement"]

    def _columns(self, k: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The chunks' rows, each repeated ``k`` times, and their order (example, site, then k)."""
        order = {s: i for i, s in enumerate(self.sites)}
        sizes = [len(c["example"]) for c in self._chunks]
        example = np.repeat(np.concatenate([c["example"] for c in self._chunks]).astype(np.int64), k)
        site = np.repeat(np.repeat([order[c["site"]] for c in self._chunks], sizes).astype(np.int64), k)
        within = np.tile(np.arange(k), sum(sizes))
        layers = pd.array([self.layers_.get(s) for s in self.sites], dtype="Int64")
        return np.lexsort((within, site, example)), {
            "example": example, "site": np.array(self.sites, dtype=object)[site], "layer": layers[site],
            "within": within}

    def _top_k_frame(self) -> pd.DataFrame:
        rank, cols = self._columns(self.k)
        ids = np.concatenate([c["token_id"] for c in self._chunks]).ravel()
        frame = pd.DataFrame({
            "example": cols["example"], "site": cols["site"], "layer": cols["layer"], "rank": cols["within"] + 1,
            "token_id": ids, "token": [self._tokens.get(t) for t in ids.tolist()],
            "logit": np.concatenate([c["logit"] for c in self._chunks]).ravel(),
            "prob": np.concatenate([c["prob"] for c in self._chunks]).ravel(),
        })
        return frame.iloc[rank].reset_index(drop=True)

    def _diff_frame(self) -> pd.DataFrame:
        n_pairs = len(self.token_pairs)
        rank, cols = self._columns(n_pairs)
        pairs = np.array(self.token_pairs, np.int64).reshape(-1, 2)[cols["within"]]
        frame = pd.DataFrame({
            "example": cols["example"], "site": cols["site"], "layer": cols["layer"],
            "pair": [f"{a}-{b}" for a, b in pairs.tolist()], "token_a": pairs[:, 0], "token_b": pairs[:, 1],
            "logit_diff": np.concatenate([c["diff"] for c in self._chunks]).ravel(),
        })
        return frame.iloc[rank].reset_index(drop=True)

    def _agreement_frame(self) -> pd.DataFrame:
        counts = np.array([self._counts[s] for s in self.sites])
        n = counts[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            frame = pd.DataFrame({
                "site": self.sites, "layer": pd.array([self.layers_.get(s) for s in self.sites], dtype="Int64"),
                "n": n, "n_agree_final": counts[:, 1], "agreement_final": counts[:, 1] / n,
                "n_agree_target": pd.array(counts[:, 2] if self.targets is not None else [None] * len(n),
                                           dtype="Int64"),
                "agreement_target": counts[:, 2] / n if self.targets is not None else np.nan,
            })
        return frame


def _token_id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{what} must hold non-negative integer token ids, got {value!r}")
    return int(value)
