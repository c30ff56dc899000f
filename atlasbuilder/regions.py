"""The region hierarchy: areas, their parents and their names.

A :class:`RegionTree` holds :class:`Region` objects (id, key, name, aliases, colour, hemisphere,
level, parent). Regions are found by id, key, exact name, alias, all-words fuzzy match or regular
expression; when nothing matches, the error ranks close candidates. Trees round-trip through
JSON and YAML (nested ``children`` lists, see ``data_manifests/juelich_hierarchy.yaml``).

Example
-------
>>> tree = load_hierarchy("juelich")
>>> tree.get("V1").key
'hOc1'
>>> [r.key for r in tree.children("hOc1")]
['hOc1_left', 'hOc1_right']
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InputError, MissingFileError, UnknownRegionError

__all__ = ["Region", "RegionTree", "builtin_hierarchy_path", "flat_hierarchy", "load_hierarchy"]

_KEY_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_COLOUR_RE = re.compile(r"#[0-9a-fA-F]{6}")
_HEMISPHERES = {"left", "right"}
BUILTIN_HIERARCHIES = {"juelich": "juelich_hierarchy.yaml"}


@dataclass(frozen=True)
class Region:
    """One node of the hierarchy.

    ``id`` is the integer label (unique; used as the value in maximum probability maps),
    ``key`` a short unique identifier (used in file names), ``name`` the full name.
    """

    id: int
    key: str
    name: str
    level: str | None = None
    parent: str | None = None
    aliases: tuple[str, ...] = ()
    colour: str = "#808080"
    hemisphere: str | None = None
    children: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (no parent/children: the nesting carries them)."""
        d: dict[str, Any] = {"id": self.id, "key": self.key, "name": self.name}
        if self.level is not None:
            d["level"] = self.level
        if self.aliases:
            d["aliases"] = list(self.aliases)
        d["colour"] = self.colour
        if self.hemisphere is not None:
            d["hemisphere"] = self.hemisphere
        return d


def _norm(text: str) -> str:
    """Lower-case, punctuation to spaces, single spaces: the form fuzzy matching compares."""
    return " ".join(re.sub(r"[^0-9a-z.]+", " ", text.lower().replace("_", " ")).split())


class RegionTree:
    """A validated region hierarchy (a forest is allowed; usually one root).

    Parameters
    ----------
    regions
        Regions with ``parent`` set to the parent's key (``None`` for roots), parents first or not.
    levels
        Level names from the root down (optional); every region's ``level`` must be one of them.
    name, version
        Descriptive metadata, kept on round trips.

    Raises
    ------
    InputError
        Duplicate ids/keys/names, unknown parents, cycles, malformed keys or colours.
    """

    def __init__(
        self,
        regions: Iterable[Region],
        *,
        levels: Iterable[str] = (),
        name: str = "",
        version: str = "",
        source: str = "",
    ) -> None:
        self.name = name
        self.version = version
        self.levels: tuple[str, ...] = tuple(levels)
        where = f"{source}: " if source else ""
        regs = list(regions)
        by_key: dict[str, Region] = {}
        by_id: dict[int, Region] = {}
        lower_keys: dict[str, str] = {}
        names: dict[str, str] = {}
        for r in regs:
            if not _KEY_RE.fullmatch(r.key) or set(r.key) <= {"."}:
                raise InputError(f"{where}region key {r.key!r} may hold only letters, digits, _ . -")
            if r.key.lower() in lower_keys:
                raise InputError(f"{where}duplicate region key {r.key!r}")
            if isinstance(r.id, bool) or not isinstance(r.id, int) or r.id < 0:
                raise InputError(f"{where}region {r.key!r}: id must be an integer >= 0, got {r.id!r}")
            if r.id in by_id:
                raise InputError(
                    f"{where}duplicate region id {r.id} ({by_id[r.id].key!r} and {r.key!r})"
                )
            if r.name.lower() in names:
                raise InputError(f"{where}duplicate region name {r.name!r}")
            if not _COLOUR_RE.fullmatch(r.colour):
                raise InputError(f"{where}region {r.key!r}: colour must be #rrggbb, got {r.colour!r}")
            if r.hemisphere is not None and r.hemisphere not in _HEMISPHERES:
                raise InputError(
                    f"{where}region {r.key!r}: hemisphere must be left or right, got {r.hemisphere!r}"
                )
            if self.levels and r.level is not None and r.level not in self.levels:
                raise InputError(
                    f"{where}region {r.key!r}: level {r.level!r} is not one of {list(self.levels)}"
                )
            by_key[r.key] = r
            by_id[r.id] = r
            lower_keys[r.key.lower()] = r.key
            names[r.name.lower()] = r.key
        children: dict[str, list[str]] = {k: [] for k in by_key}
        for r in regs:
            if r.parent is not None:
                if r.parent not in by_key:
                    raise InputError(f"{where}region {r.key!r}: unknown parent {r.parent!r}")
                children[r.parent].append(r.key)
        # freeze children into the regions (in input order) and check for cycles
        self._regions: dict[str, Region] = {}
        for r in regs:
            self._regions[r.key] = Region(
                id=r.id, key=r.key, name=r.name, level=r.level, parent=r.parent,
                aliases=tuple(r.aliases), colour=r.colour.lower(), hemisphere=r.hemisphere,
                children=tuple(children[r.key]),
            )
        for r in regs:
            seen = {r.key}
            p = r.parent
            while p is not None:
                if p in seen:
                    raise InputError(f"{where}cycle in the hierarchy through {r.key!r}")
                seen.add(p)
                p = by_key[p].parent
        self._by_id = {r.id: r.key for r in regs}
        self._lower_keys = lower_keys
        self._names = names
        self._aliases: dict[str, set[str]] = {}
        for r in regs:
            for a in r.aliases:
                self._aliases.setdefault(a.lower(), set()).add(r.key)

    # -- container protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self) -> Iterator[Region]:
        return iter(self._regions.values())

    def __contains__(self, query: object) -> bool:
        try:
            self.get(query)  # type: ignore[arg-type]
        except (UnknownRegionError, TypeError):
            return False
        return True

    def __getitem__(self, query: int | str | Region) -> Region:
        return self.get(query)

    def __repr__(self) -> str:
        return f"RegionTree({self.name!r}, {len(self)} regions, {len(self.leaves())} leaves)"

    # -- lookup ---------------------------------------------------------------------------------
    def get(self, query: int | str | Region) -> Region:
        """Find exactly one region.

        Tried in order: a :class:`Region`; an integer id (or a string of digits that is an id);
        key (case-insensitive); exact name (case-insensitive); alias; ``re:PATTERN`` regular
        expression (search, case-insensitive) over keys, names and aliases; all-words fuzzy match
        (every word of the query appears in the name, key or an alias).

        Raises
        ------
        UnknownRegionError
            Nothing matched (with ranked suggestions) or several regions matched.
        """
        if isinstance(query, Region):
            if query.key in self._regions and self._regions[query.key].id == query.id:
                return self._regions[query.key]
            raise UnknownRegionError(f"region {query.key!r} (id {query.id}) is not in this hierarchy")
        if isinstance(query, bool):
            raise UnknownRegionError(f"not a region: {query!r}")
        if isinstance(query, int):
            if query in self._by_id:
                return self._regions[self._by_id[query]]
            raise UnknownRegionError(f"no region with id {query}")
        if not isinstance(query, str):
            raise TypeError(f"region query must be int or str, got {type(query).__name__}")
        q = query.strip()
        if q.isascii() and q.isdecimal() and int(q) in self._by_id:
            return self._regions[self._by_id[int(q)]]
        low = q.lower()
        if low in self._lower_keys:
            return self._regions[self._lower_keys[low]]
        if low in self._names:
            return self._regions[self._names[low]]
        if low in self._aliases:
            keys = self._aliases[low]
            if len(keys) == 1:
                return self._regions[next(iter(keys))]
            raise UnknownRegionError(
                f"alias {query!r} is ambiguous: it names {len(keys)} regions", sorted(keys)
            )
        matches = self.find(q)
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            # a unique shallowest match (e.g. an area over its hemisphere leaves) wins
            depths = [self.depth(m) for m in matches]
            top = [m for m, d in zip(matches, depths, strict=True) if d == min(depths)]
            if len(top) == 1 and all(
                top[0].key in [a.key for a in self.ancestors(m)] for m in matches if m is not top[0]
            ):
                return top[0]
            raise UnknownRegionError(
                f"region query {query!r} is ambiguous: it matches {len(matches)} regions",
                [m.key for m in matches[:10]],
            )
        raise UnknownRegionError(f"no region matches {query!r}", self.suggest(q))

    def find(self, text: str) -> list[Region]:
        """All regions matching ``text``, best first (no error when nothing matches).

        ``re:PATTERN`` searches keys, names and aliases with a case-insensitive regular
        expression; otherwise every word of ``text`` must occur in the key, name or an alias.
        Results are ranked: exact key/name/alias first, then shallower regions, then shorter
        names, then hierarchy order.
        """
        if text.startswith("re:"):
            try:
                pat = re.compile(text[3:], re.IGNORECASE)
            except re.error as exc:
                raise InputError(f"invalid regular expression {text[3:]!r}: {exc}") from None
            return [
                r for r in self if any(pat.search(s) for s in (r.key, r.name, *r.aliases))
            ]
        words = _norm(text).split()
        if not words:
            return []
        hits: list[tuple[int, int, int, Region]] = []
        for r in self:
            hay = [_norm(s) for s in (r.key, r.name, *r.aliases)]
            if all(any(_word_in(w, h) for h in hay) for w in words):
                exact = any(h == " ".join(words) for h in hay)
                hits.append((0 if exact else 1, self.depth(r), len(r.name), r))
        hits.sort(key=lambda t: t[:3])
        return [h[3] for h in hits]

    def suggest(self, text: str, n: int = 5) -> list[str]:
        """Up to ``n`` region keys whose key, name or alias is closest to ``text``."""
        cands: dict[str, str] = {}
        for r in self:
            for s in (r.key, r.name, *r.aliases):
                cands.setdefault(s.lower(), r.key)
        close = difflib.get_close_matches(text.lower(), list(cands), n=n * 3, cutoff=0.5)
        out: list[str] = []
        for c in close:
            if cands[c] not in out:
                out.append(cands[c])
        # also regions sharing any word with the query
        words = set(_norm(text).split())
        for r in self:
            if len(out) >= n:
                break
            if r.key not in out and words & set(_norm(" ".join((r.key, r.name, *r.aliases))).split()):
                out.append(r.key)
        return out[:n]

    # -- structure ------------------------------------------------------------------------------
    def roots(self) -> list[Region]:
        return [r for r in self if r.parent is None]

    def parent(self, query: int | str | Region) -> Region | None:
        r = self.get(query)
        return None if r.parent is None else self._regions[r.parent]

    def children(self, query: int | str | Region) -> list[Region]:
        return [self._regions[k] for k in self.get(query).children]

    def ancestors(self, query: int | str | Region) -> list[Region]:
        """Parent, grandparent, ... up to the root."""
        out = []
        p = self.parent(query)
        while p is not None:
            out.append(p)
            p = self.parent(p)
        return out

    def descendants(self, query: int | str | Region) -> list[Region]:
        """All regions below (depth-first, in order)."""
        out: list[Region] = []
        stack = list(reversed(self.children(query)))
        while stack:
            r = stack.pop()
            out.append(r)
            stack.extend(reversed([self._regions[k] for k in r.children]))
        return out

    def leaves(self, query: int | str | Region | None = None) -> list[Region]:
        """Leaf regions (below ``query``, or of the whole tree). A leaf is its own only leaf."""
        if query is None:
            return [r for r in self if not r.children]
        r = self.get(query)
        if not r.children:
            return [r]
        return [d for d in self.descendants(r) if not d.children]

    def depth(self, query: int | str | Region) -> int:
        return len(self.ancestors(query))

    def at_level(self, level: str) -> list[Region]:
        """Regions whose ``level`` is ``level`` (see :attr:`levels`)."""
        if self.levels and level not in self.levels:
            raise InputError(f"unknown level {level!r}; levels are {list(self.levels)}")
        return [r for r in self if r.level == level]

    def walk(self) -> Iterator[tuple[int, Region]]:
        """(depth, region) in depth-first order, for printing a tree."""
        for root in self.roots():
            yield 0, root
            for d in self.descendants(root):
                yield self.depth(d), d

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def node(r: Region) -> dict[str, Any]:
            d = r.to_dict()
            if r.children:
                d["children"] = [node(self._regions[k]) for k in r.children]
            return d

        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        if self.version:
            out["version"] = self.version
        if self.levels:
            out["levels"] = list(self.levels)
        out["regions"] = [node(r) for r in self.roots()]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "") -> RegionTree:
        """Build from the nested form written by :meth:`to_dict`."""
        where = f"{source}: " if source else ""
        if not isinstance(data, Mapping) or not isinstance(data.get("regions"), list):
            raise InputError(f"{where}a hierarchy needs a 'regions' list at the top level")
        allowed = {"id", "key", "name", "level", "aliases", "colour", "color", "hemisphere",
                   "children"}
        regions: list[Region] = []

        def visit(node: Any, parent: str | None, path: str) -> None:
            if not isinstance(node, Mapping):
                raise InputError(f"{where}{path}: expected a mapping, got {type(node).__name__}")
            extra = set(node) - allowed
            if extra:
                raise InputError(f"{where}{path}: unknown field(s) {sorted(extra)}")
            for req in ("id", "key", "name"):
                if req not in node:
                    raise InputError(f"{where}{path}: missing field {req!r}")
            aliases = node.get("aliases") or []
            if not isinstance(aliases, list):
                raise InputError(f"{where}{path}.aliases: expected a list")
            regions.append(Region(
                id=node["id"], key=str(node["key"]), name=str(node["name"]),
                level=node.get("level"), parent=parent,
                aliases=tuple(str(a) for a in aliases),
                colour=str(node.get("colour", node.get("color", "#808080"))),
                hemisphere=node.get("hemisphere"),
            ))
            kids = node.get("children") or []
            if not isinstance(kids, list):
                raise InputError(f"{where}{path}.children: expected a list")
            for i, child in enumerate(kids):
                visit(child, str(node["key"]), f"{path}.children[{i}]")

        for i, root in enumerate(data["regions"]):
            visit(root, None, f"regions[{i}]")
        return cls(
            regions, levels=data.get("levels") or (), name=str(data.get("name", "")),
            version=str(data.get("version", "")), source=source,
        )

    def to_json(self, path: str | Path) -> None:
        from .storage import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False))

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        from .storage import atomic_write_text

        atomic_write_text(
            path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)
        )


def _word_in(word: str, hay: str) -> bool:
    """A query word matches a word of ``hay`` by prefix (so 'vis' finds 'visual')."""
    return any(w.startswith(word) for w in hay.split())


def builtin_hierarchy_path(name: str) -> Path:
    """Path of a hierarchy shipped in ``data_manifests/`` (e.g. ``"juelich"``)."""
    fname = BUILTIN_HIERARCHIES[name]
    for base in (resources.files("atlasbuilder") / "data_manifests",
                 Path(__file__).resolve().parent.parent / "data_manifests"):
        p = Path(str(base)) / fname
        if p.is_file():
            return p
    raise MissingFileError(fname, "built-in hierarchy file")


def load_hierarchy(source: str | Path | Mapping[str, Any]) -> RegionTree:
    """Load a hierarchy from a YAML/JSON file, a built-in name (``"juelich"``) or a dict.

    Raises
    ------
    MissingFileError
        The file does not exist.
    InputError
        The file cannot be parsed or the hierarchy is invalid (message names the file).
    """
    if isinstance(source, Mapping):
        return RegionTree.from_dict(source)
    if isinstance(source, str) and source in BUILTIN_HIERARCHIES:
        path = builtin_hierarchy_path(source)
    else:
        path = Path(source)
    if not path.is_file():
        raise MissingFileError(path, "hierarchy file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError carry the line
        raise InputError(f"{path}: cannot parse hierarchy: {exc}".splitlines()[0]) from None
    return RegionTree.from_dict(data, source=str(path))


def flat_hierarchy(names: Iterable[str], *, ids: Iterable[int] | None = None,
                   root_name: str = "All regions") -> RegionTree:
    """A two-level tree (a root and one leaf per name), for atlases imported without a hierarchy.

    Keys are the names made file-name safe (``GM_Broca's_area_BA44_L`` -> ``GM_Brocas_area_BA44_L``);
    the original name is kept as an alias.
    """
    names = list(names)
    ids_l = list(ids) if ids is not None else list(range(1, len(names) + 1))
    lower_names = [nm.lower() for nm in names]
    root_key, n = "root", 2
    while root_key in lower_names or root_key in [re.sub(r"\W+", "_", x) for x in lower_names]:
        root_key, n = f"root_{n}", n + 1
    regions = [Region(id=max(ids_l, default=0) + 1, key=root_key, name=root_name,
                      level="root", colour="#ffffff")]
    used: set[str] = {root_key}
    palette = _palette(len(names))
    for i, (nm, rid) in enumerate(zip(names, ids_l, strict=True)):
        base = re.sub(r"[^A-Za-z0-9_.\-]+", "_", nm.replace("'", "")).strip("_.")
        base = base or f"region{rid}"
        key, n = base, 2
        # a key may not repeat another key, nor equal another region's name (keys win lookups)
        while key.lower() in used or (key.lower() in lower_names and key.lower() != nm.lower()):
            key, n = f"{base}_{n}", n + 1
        used.add(key.lower())
        regions.append(Region(id=rid, key=key, name=nm, level="region", parent=root_key,
                              aliases=(nm,) if nm != key else (), colour=palette[i]))
    return RegionTree(regions, levels=("root", "region"), name="flat")


def _palette(n: int) -> list[str]:
    """``n`` distinct, deterministic colours (golden-ratio hue steps)."""
    import colorsys

    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95)
        out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return out
