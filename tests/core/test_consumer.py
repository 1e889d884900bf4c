"""The consumer protocol as the runner meets it: one frozen RunContext per pass, declared
subsets pooled by the runner and handed in, and the earlier keyword form of start()."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lm_probe import Consumer, ProbeConfig, ProbeDataset, ProbeRunner
from lm_probe.core.consumer import RunContext, SubsetRequest
from lm_probe.core.sites import Site
from lm_probe.core.sources import ArraySource

SITES = ["a.output", "b.output"]


def source_of(n=60, d=3, seed=0):
    rng = np.random.default_rng(seed)
    data = ProbeDataset([np.array([1, 2])] * n, rng.integers(0, 2, n))
    rows = {(s, "mean"): rng.normal(size=(n, d)).astype(np.float32) for s in SITES}
    return data, rows, ArraySource(rows, data.example_ids, {s: Site(k, s[:1], "output", s, k) for k, s in
                                                            enumerate(SITES)})


class Counting:
    """A source that counts the examples it reads, by dataset."""

    def __init__(self, inner):
        self.inner, self.reads = inner, []
        self.replayable = inner.replayable

    def read(self, batch, data, requests):
        self.reads.append((data, len(batch.index)))
        return self.inner.read(batch, data, requests)

    def resolve(self, specs):
        return self.inner.resolve(specs)

    def examples(self, data):
        return sum(n for d, n in self.reads if d is data)


class Batches(Consumer):
    """Reads every batch of one request (keeps the pass going)."""

    requests = (("a.output", "mean"),)

    def update(self, batch):
        pass


class EveryStep(Consumer):
    """Reads no batch; asks for the rows of a fixed subset at every step and at the end."""

    requests = ()

    def __init__(self, index):
        self.index, self.contexts, self.observed = index, [], []

    @property
    def active(self):
        return False

    def site_specs(self):
        return list(SITES)

    def start(self, context):
        self.contexts.append(context)
        self.subset = SubsetRequest(context.data.subset(self.index), tuple((s, "mean") for s in SITES), 4)

    def subset_due(self, event, step, epoch):
        return self.subset if event in ("step", "end") else None

    def observe(self, acts, event, step, epoch):
        self.observed.append((event, step, acts))


def test_a_declared_subset_is_pooled_by_the_runner_once_per_call_and_handed_in():
    data, rows, inner = source_of()
    source = Counting(inner)
    index = np.array([3, 10, 11, 40, 59])
    reader = EveryStep(index)
    runner = ProbeRunner.from_source(source, [], consumers=[reader, Batches()], progress=False)
    runner.collect(data, batch_size=20)
    batches = -(-len(data) // 20)
    assert [(event, step) for event, step, _ in reader.observed] == [("step", k) for k in range(1, batches + 1)] + [
        ("end", batches)]
    subset = reader.subset.data
    assert source.examples(subset) == len(index), "pooled once for its four firings"
    assert source.examples(data) == len(data)
    for _, _, acts in reader.observed:
        for request in reader.subset.requests:
            np.testing.assert_array_equal(acts[request], rows[request][index])
    runner.collect(data, batch_size=20)
    assert source.examples(reader.subset.data) == len(index), "a new call pools its subset again"
    assert len(source.reads) == 2 * (batches + 2), "each subset in two batches of 4 (its own batch size)"


def test_the_context_is_frozen_and_its_sites_read_only():
    data, _, source = source_of()
    reader = EveryStep(np.arange(4))
    ProbeRunner.from_source(source, [], consumers=[reader], progress=False).collect(data, batch_size=16)
    context, = reader.contexts
    assert context.data is data and context.batch_size == 16 and context.model is None and context.training == {}
    assert context.sites["b.output"].layer == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.batch_size = 8
    with pytest.raises(TypeError):
        context.sites["c.output"] = None


def test_probes_get_the_same_context_with_their_training_settings():
    data, _, source = source_of()
    seen = EveryStep(np.arange(4))
    runner = ProbeRunner.from_source(source, [ProbeConfig("a.output", name="p")], consumers=[seen], progress=False)
    starts = []
    probe = runner["p"]
    original = probe.start
    probe.start = lambda context: (starts.append(context), original(context))[1]
    runner.fit_probes(data, num_epochs=1, val_size=0.2, batch_size=8, eval_every=3, patience=7)
    (other,), (mine,) = seen.contexts, starts
    assert (mine.model, mine.data, mine.batch_size) == (other.model, other.data, other.batch_size)
    assert len(mine.data) == len(data) - 12, "the fit split, without the validation share"
    training = mine.training["p"]
    assert training.classes == (0, 1) and training.eval_every == 3 and training.early_stopping.patience == 7
    assert len(training.validation[0]) == 12 and probe.n_steps_ == -(-48 // 8)


class OldStyle(Consumer):
    """A consumer written for the keyword form of start()."""

    requests = (("a.output", "mean"),)

    def __init__(self):
        self.started, self.rows = None, 0

    def start(self, *, model=None, sites=None, data=None, batch_size=None, **rest):
        self.started = dict(model=model, sites=sites, data=data, batch_size=batch_size, **rest)

    def update(self, batch):
        self.rows += len(batch.labels)


def test_a_consumer_of_the_earlier_keyword_form_still_runs_with_a_warning():
    data, _, source = source_of()
    old = OldStyle()
    runner = ProbeRunner.from_source(source, [], consumers=[old], progress=False)
    with pytest.warns(FutureWarning, match=r"OldStyle.start\(\*\*keywords\) is the consumer protocol's earlier form"):
        runner.collect(data, batch_size=16)
    assert old.rows == len(data)
    assert old.started["data"] is data and old.started["batch_size"] == 16 and old.started["runner"] is runner
    assert list(old.started["sites"]) == ["a.output"] and old.started["model"] is None


def test_the_base_start_takes_the_context():
    class Minimal(Consumer):
        pass

    Minimal().start(RunContext())  # the base start accepts the context and does nothing
