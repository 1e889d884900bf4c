"""Circuits: which weights carry a property, not only whether a site holds it.

The frozen-model probes say a property can be read at a site. The probes here train
*through* the model: a binary mask over the weights of chosen modules is learned (a
hard-concrete or continuous-sparsification relaxation with an L0-style penalty) while the
base weights stay frozen and untouched, and :func:`ablate` removes the found subnetwork
to measure what the model does without it.

* :class:`SubnetworkProbe` (Cao, Sanh and Rush 2021): a linear or MLP probe and the mask,
  trained jointly; the accuracy reached, with how few weights kept.
* :class:`CircuitProbe` (Lepori, Serre and Pavlick 2024): the mask alone, trained so that
  the masked model's representation at the site clusters by label (soft nearest neighbour
  loss), scored by a nearest-centroid readout.

They share sites, datasets, pooling, metrics and early stopping with the rest of the
package, and know :mod:`lm_probe.core`, :mod:`lm_probe.functional` and :mod:`lm_probe.probes`.
"""

from .circuit import CircuitProbe, soft_nearest_neighbour_loss
from .subnetwork import SubnetworkProbe
from .targets import ablate, resolve_masked
from .training import MaskedProbe, NotFittedError

__all__ = ["SubnetworkProbe", "CircuitProbe", "MaskedProbe", "NotFittedError", "ablate", "resolve_masked",
           "soft_nearest_neighbour_loss"]
