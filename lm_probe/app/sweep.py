"""The sweep of an experiment: its sites, expanded and checked, and its probes.

``[sites]`` gives site strings with brace ranges and site kinds (:func:`expand_sites`);
each is resolved against the model, and every bad path, kind and site is reported
together. A probe sweep is the cartesian product of the list-valued settings of
``[probes]`` (in file order), for every site (:func:`probe_specs`). A probe is named
after its site and its swept settings only: ``model.layers.3.output/mean/alpha=0.001``;
with nothing swept, its name is the site.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from ..probes.config import ProbeConfig
from .braces import expand_in, parse_layers
from .problems import ExperimentError, Problems
from .schema import SWEEPABLE, ProbesSection, SitesSection

__all__ = ["ProbeSpec", "expand_sites", "probe_specs", "check_estimator"]


@dataclass(frozen=True)
class ProbeSpec:
    """One probe of the sweep: its name, site and settings (only swept ones in ``variant``)."""

    name: str
    site: str
    settings: dict
    variant: dict
    config: ProbeConfig

    @property
    def variant_label(self) -> str:
        """The swept settings as a line label (``"mean/alpha=0.001"``), ``"-"`` when nothing is swept."""
        return "/".join(_format_setting(k, v) for k, v in self.variant.items()) or "-"


def expand_sites(section: SitesSection, model: Any) -> list[str]:
    """Canonical site strings from paths (braces expanded) and kinds, each checked against the model;
    every bad path, kind and site is reported together."""
    from ..core.architectures import sites as sites_of_kind
    from ..core.sites import SiteError, resolve_sites

    problems, found = Problems(), {}  # found: canonical site -> where it came from
    wanted: list[tuple[str, str]] = []
    for p in section.paths:
        with problems.collect():
            wanted += [(s, f"paths {p!r}") for s in expand_in(p, "[sites] paths")]
    if section.kind:
        with problems.collect():
            layers = parse_layers(section.layers)
            for kind in section.kind:
                try:
                    wanted += [(s, f"kind {kind!r}") for s in sites_of_kind(model, kind, layers)]
                except ValueError as err:
                    problems.add(f"[sites] kind = {kind!r}, layers = {section.layers!r}: {err}")
    elif section.layers != "all":
        problems.add("[sites] layers applies to kind; with paths, write the layers in the path "
                     "('model.layers.{0..29}.output')")
    for spec, origin in wanted:
        try:
            site = resolve_sites(model._module, [spec])[spec]
        except SiteError as err:
            problems.add(f"[sites] {err}")
            continue
        if site.name in found:
            problems.add(f"[sites] site {site.name!r} is listed twice ({found[site.name]} and {origin}); "
                         "list each site once")
        found[site.name] = origin
    problems.raise_any()
    return list(found)


def probe_specs(section: ProbesSection, sites: list[str]) -> list[ProbeSpec]:
    """The sweep: per site, one probe per combination of list-valued settings (file order)."""
    axes = [(k, _values(getattr(section, k))) for k in SWEEPABLE] + list(section.estimator)
    keys = [k for k, _ in axes]
    swept = [k for k, values in axes if len(values) > 1]
    specs = []
    for site in sites:
        for combo in itertools.product(*[values for _, values in axes]):
            settings = dict(zip(keys, combo))
            variant = {k: settings[k] for k in swept}
            name = "/".join([site, *(_format_setting(k, v) for k, v in variant.items())])
            own = {k: settings[k] for k in SWEEPABLE}
            estimator = {k: _toml_to_python(settings[k]) for k, _ in section.estimator}
            try:
                config = ProbeConfig(site, pool=own["pool"], head=own["head"], task=section.task, name=name,
                                     control=own["control"], standardize=own["standardize"],
                                     hidden_size=own["hidden_size"], solver=own["solver"], **estimator)
            except (TypeError, ValueError) as err:
                raise ExperimentError(f"[probes] {err}") from None
            specs.append(ProbeSpec(name, site, settings, variant, config))
    return specs


def _values(value: Any) -> tuple:
    """The values of a setting: a sweep's tuple, or a single value."""
    return value if isinstance(value, tuple) else (value,)


def _toml_to_python(value: Any) -> Any:
    """TOML values for scikit-learn: a table of class weights gets integer keys."""
    if isinstance(value, dict):
        return {int(k) if re.fullmatch(r"-?\d+", k) else k: v for k, v in value.items()}
    return tuple(value) if isinstance(value, list) else value


def _format_setting(key: str, value: Any) -> str:
    if key == "pool":
        return str(value)
    return f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"


def check_estimator(spec: ProbeSpec) -> None:
    """scikit-learn checks argument values only when fitting: check them now, before any forward."""
    estimator, _ = spec.config.build_estimator(None)  # alpha="auto" resolved (for no rows: a number to check)
    validate = getattr(estimator, "_validate_params", None)
    if validate is None:
        return
    try:
        validate()
    except ValueError as err:
        raise ExperimentError(f"[probes] probe {spec.name!r}: {err}") from None
