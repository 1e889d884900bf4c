"""The flow up to the consumers: data, sites, the one trace per batch, the protocol.

A :class:`~lm_probe.core.dataset.ProbeDataset` is batched; site strings are parsed and
checked once (:mod:`~lm_probe.core.sites`, :mod:`~lm_probe.core.architectures`); one
nnsight trace per batch reads and pools them (:mod:`~lm_probe.core.trace`,
:mod:`~lm_probe.core.pooling`), or a stored run or the replay cache gives the same rows
(:mod:`~lm_probe.core.sources`, :mod:`~lm_probe.core.replay`); and every consumer meets
the pass through one protocol (:mod:`~lm_probe.core.consumer`). Core knows no probe and
no particular consumer; it imports only :mod:`lm_probe.functional`.
"""
