"""Pure functions on arrays: the math of every statistic lm_probe computes.

Streaming moments (:mod:`~lm_probe.functional.stats`), spectra, CKA and novelty
(:mod:`~lm_probe.functional.spectra`), Frequent Directions
(:mod:`~lm_probe.functional.sketch`), diffusion operators
(:mod:`~lm_probe.functional.diffusion`), probe metrics
(:mod:`~lm_probe.functional.metrics`), their bootstrap intervals
(:mod:`~lm_probe.functional.bootstrap`) and seeded hashes of row identities
(:mod:`~lm_probe.functional.hashing`). Nothing here keeps state or imports the rest of
lm_probe: the consumers hold state and call these functions, so each can be tested on
plain arrays against a float64 reference.
"""
