"""The consumers that are not probes: geometry accumulators, diffusion gauges, the logit
lens and the activation store.

Each meets the pass through the protocol of :mod:`lm_probe.core.consumer` and keeps its
math in :mod:`lm_probe.functional`; none knows the probes or the runner.
"""
