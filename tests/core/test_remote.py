"""Remote execution, simulated offline with nnsight's remote="local" backend (the trace is
serialized and deserialized with non-installed modules hidden, as on a server)."""

from __future__ import annotations

import pandas as pd

from lm_probe import ProbeConfig, ProbeRunner


def test_remote_local_gives_the_same_metrics(gpt2, toy):
    train, test = toy[0].subset(range(96)), toy[1].subset(range(32))  # each remote trace costs ~1 s
    configs = lambda: [ProbeConfig("transformer.h.1.output"), ProbeConfig("transformer.h.3.output", pool="last")]
    fit = dict(batch_size=16, num_epochs=1, eval_every=5, patience=3)
    local = ProbeRunner(gpt2, configs(), seed=2, progress=False).fit_probes(train, test, **fit).metrics
    remote = ProbeRunner(gpt2, configs(), seed=2, progress=False, remote="local").fit_probes(train, test, **fit).metrics
    pd.testing.assert_frame_equal(remote, local)
