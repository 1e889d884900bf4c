"""Sites: where in the model a probe reads.

A site is a module path plus ``.output`` or ``.input``, written the way a user would
type it in nnsight (``"model.layers.5.mlp.output"``, ``"model.layers[-1].output"``,
``"transformer.h.3.input"``). Site strings are parsed once, when the runner is built,
and checked against the model's module tree before any forward pass: an unknown path
raises :class:`SiteError` quoting the string and naming the closest valid paths. After
that nothing splits a name again; every consumer works with the resolved
:class:`Site` (canonical path, layer index, execution rank).

Reads inside an nnsight trace must follow execution order. The rank of a site is its
position in the depth-first *enter/exit* sequence of the module tree (a module's input
is read on entry, its output on exit, after all of its children), which matches the
execution order of Hugging Face transformer stacks, whose modules are registered in
the order they run.
"""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch

__all__ = ["Site", "SiteError", "parse_site", "resolve_sites", "module_paths"]

_PART = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)?(?P<index>(\[-?\d+\])*)$")
_ATTRS = ("output", "input")


class SiteError(ValueError):
    """A site string that does not name a module of the model."""


@dataclass(frozen=True, order=True)
class Site:
    """A resolved read location.

    Attributes:
        rank: Position in execution order (smaller runs earlier).
        path: Canonical module path with non-negative indices (``"model.layers.29"``).
        attr: ``"output"`` or ``"input"``.
        spec: The string the user wrote.
        layer: The first integer index in the path (the block number), or ``None``.
    """

    rank: int
    path: str
    attr: str
    spec: str
    layer: int | None

    @property
    def name(self) -> str:
        """Canonical site string, e.g. ``"model.layers.29.output"``."""
        return f"{self.path}.{self.attr}" if self.path else self.attr

    def envoy(self, model: Any) -> Any:
        """The nnsight envoy for this site's module, walked from ``model``."""
        from nnsight import Envoy

        node = model
        for part in self.path.split(".") if self.path else ():
            if part.isdigit():
                node = node[int(part)]
                continue
            if inspect.isdatadescriptor(getattr(Envoy, part, None)):
                # nnsight serves .output/.input on every envoy, so it mounts a submodule
                # named like one of them (BERT's `output`) as `E_output`
                part = Envoy.OVERLOAD_PREFIX + part
            node = getattr(node, part)
        return node


def parse_site(spec: str) -> tuple[tuple[str | int, ...], str]:
    """Split a site string into module path parts and ``"output"``/``"input"``.

    Args:
        spec: e.g. ``"model.layers[-1].mlp.output"`` or ``"transformer.h.5.output"``.

    Returns:
        ``(parts, attr)`` with integer parts for indices, e.g.
        ``(("model", "layers", -1, "mlp"), "output")``.

    Raises:
        SiteError: the string is malformed or lacks ``.output`` / ``.input``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SiteError(f"site {spec!r} must be a non-empty string such as 'model.layers.3.output'")
    pieces = spec.strip().split(".")
    attr = pieces[-1]
    if attr not in _ATTRS:
        raise SiteError(
            f"site {spec!r} must end in '.output' or '.input' (e.g. '{spec}.output')"
        )
    parts: list[str | int] = []
    for piece in pieces[:-1]:
        if re.fullmatch(r"-?\d+", piece):
            parts.append(int(piece))
            continue
        match = _PART.match(piece)
        if piece == "" or match is None:
            raise SiteError(f"site {spec!r}: cannot parse the part {piece!r}")
        if match.group("name"):
            parts.append(match.group("name"))
        parts.extend(int(i) for i in re.findall(r"-?\d+", match.group("index")))
    return tuple(parts), attr


def module_paths(module: torch.nn.Module) -> list[str]:
    """All module paths of ``module`` in depth-first registration order ('' is the root)."""
    return [name for name, _ in module.named_modules()]


def _event_ranks(module: torch.nn.Module) -> dict[tuple[str, str], int]:
    """Rank of each (path, 'input'|'output') in the depth-first enter/exit sequence."""
    ranks: dict[tuple[str, str], int] = {}

    def walk(node: torch.nn.Module, path: str) -> None:
        ranks[(path, "input")] = len(ranks)
        for name, child in node.named_children():
            walk(child, f"{path}.{name}" if path else name)
        ranks[(path, "output")] = len(ranks)

    walk(module, "")
    return ranks


def _resolve_path(root: torch.nn.Module, parts: tuple[str | int, ...], spec: str) -> str:
    node, canonical = root, []
    for part in parts:
        if isinstance(part, int):
            if not isinstance(node, (torch.nn.ModuleList, torch.nn.Sequential)):
                raise KeyError(part)
            size = len(node)
            if not -size <= part < size:
                raise SiteError(
                    f"site {spec!r}: index {part} is out of range for "
                    f"'{'.'.join(canonical)}' which has {size} entries (0..{size - 1})"
                )
            part = part % size
            node = node[part]
        else:
            children = dict(node.named_children())
            if part not in children:
                raise KeyError(part)
            node = children[part]
        canonical.append(str(part))
    return ".".join(canonical)


def _closest(wanted: str, paths: list[str], n: int = 5) -> list[str]:
    """Valid paths most like ``wanted``: by spelling, and among paths with the same indices."""
    close = difflib.get_close_matches(wanted, paths, n=n, cutoff=0.5)
    digits = re.findall(r"\d+", wanted)
    if digits:
        same = [p for p in paths if re.findall(r"\d+", p) == digits]
        same.sort(key=lambda p: -difflib.SequenceMatcher(None, wanted, p).ratio())
        close += [p for p in same[:3] if p not in close]
    return close[:n] or paths[:n]


def resolve_sites(module: torch.nn.Module, specs: Iterable[str]) -> dict[str, Site]:
    """Parse and check site strings against a model's module tree.

    Args:
        module: The underlying ``torch.nn.Module`` (the Hugging Face model).
        specs: Site strings as the user wrote them.

    Returns:
        ``{spec: Site}`` for every input string.

    Raises:
        SiteError: a site is malformed or names no module; the message quotes it and
            lists the closest valid site strings.
    """
    ranks = _event_ranks(module)
    paths = [p for p in module_paths(module) if p]
    resolved: dict[str, Site] = {}
    for spec in specs:
        parts, attr = parse_site(spec)
        try:
            path = _resolve_path(module, parts, spec)
        except KeyError:
            wanted = ".".join(str(p) for p in parts)
            hint = ", ".join(f"'{c}.{attr}'" for c in _closest(wanted, paths))
            raise SiteError(
                f"site {spec!r}: the model ({type(module).__name__}) has no module "
                f"'{wanted}'. Closest valid sites: {hint}"
            ) from None
        layer = next((int(p) for p in path.split(".") if p.isdigit()), None)
        resolved[spec] = Site(ranks[(path, attr)], path, attr, spec, layer)
    return resolved
