"""Probes: what they are (config), how they learn (the probe, its heads, the torch bank,
early stopping, control tasks), how they are scored and saved.

Probes are consumers of the core's pooled batches; they know :mod:`lm_probe.core` and
:mod:`lm_probe.functional`, and no other consumer.
"""
