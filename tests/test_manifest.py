"""Tests of the manifest schema and its validation (atlasbuilder.manifest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlasbuilder.errors import InputError, ManifestError
from atlasbuilder.manifest import (
    QUICK_EPOCHS,
    QUICK_OVERLAP,
    QUICK_WIDTH,
    Manifest,
    builtin_manifest_path,
    load_manifest,
    validate_manifest,
)

# A valid real-data manifest; the brains' files are made by `make_brain`.
VALID = """\
format_version: 1
atlas: {name: test-atlas, version: "0.1"}
hierarchy: juelich
areas: [hOc1, hOc2]
spaces:
  reference: [MNI152NLin2009cAsym]
subjects:
  - id: B01
    hemispheres: [left, right]
    sections:
      files: sections/B01/*.tif
      number_pattern: '_s(\\d+)'
      plane: coronal
      thickness_um: 20
      pixel_size_um: 20
      spacing: 15
    annotations:
      files: annotations/B01/*.png
      labels: {1: hOc1_left, 2: hOc2_left, 3: hOc1_right}
"""

TINY_HIERARCHY = """\
name: tiny
levels: [brain, area, hemisphere]
regions:
  - id: 100
    key: brain
    name: Brain
    level: brain
    children:
      - id: 10
        key: hOc1
        name: Area hOc1
        level: area
        aliases: [V1]
        children:
          - {id: 1, key: hOc1_left, name: Area hOc1 left, level: hemisphere, hemisphere: left}
          - {id: 2, key: hOc1_right, name: Area hOc1 right, level: hemisphere, hemisphere: right}
"""


def make_brain(
    root: Path,
    sid: str,
    sections: tuple[int, ...] = (1, 16, 31),
    annotated: tuple[int, ...] = (16,),
) -> None:
    """Empty stand-ins for a brain's section and annotation images (the manifest reads names)."""
    (root / "sections" / sid).mkdir(parents=True)
    (root / "annotations" / sid).mkdir(parents=True)
    for n in sections:
        (root / "sections" / sid / f"{sid}_s{n:04d}.tif").touch()
    for n in annotated:
        (root / "annotations" / sid / f"{sid}_s{n:04d}.png").touch()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line of the n-th line containing ``needle``."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    return hits[occurrence - 1]


def at(text: str, needle: str, token: str | None = None, occurrence: int = 1) -> str:
    """"(line L, col C)" of ``token`` (default: ``needle``) on the n-th line holding ``needle``."""
    line = line_of(text, needle, occurrence)
    col = text.splitlines()[line - 1].index(token or needle) + 1
    return f"(line {line}, col {col})"


def one_problem(problems: list[str], *parts: str) -> str:
    """The single problem that contains every part (fails if none or several)."""
    hits = [p for p in problems if all(part in p for part in parts)]
    assert len(hits) == 1, f"{parts} found {len(hits)} times in:\n" + "\n".join(problems)
    return hits[0]


# -- the shipped manifests -----------------------------------------------------------------------


def test_demo_manifest_loads() -> None:
    m = load_manifest(builtin_manifest_path("demo"))
    assert m.is_synthetic and m.synthetic is not None
    assert m.synthetic.subjects == 10 and m.synthetic.quick_subjects == 3
    assert m.areas == ["hOc1", "hOc2", "hOc3v", "hOc4v", "hOc5"]
    assert m.spaces.reference == ["MNI152NLin2009cAsym", "BigBrain"]
    assert m.primary_space == "MNI152NLin2009cAsym"
    assert m.hierarchy_source() == "juelich"
    assert m.subjects == []
    assert m.path == builtin_manifest_path("demo").absolute()
    tree = m.load_hierarchy()
    assert {r.key for r in tree.children("hOc1")} == {"hOc1_left", "hOc1_right"}


def test_template_validates_without_files_and_reports_its_missing_files() -> None:
    path = builtin_manifest_path("template")
    assert validate_manifest(path, check_files=False) == []
    m = load_manifest(path, check_files=False)
    assert [s.id for s in m.subjects] == ["B01", "B02"]
    assert m.subject("B02").hemispheres == ["right"]
    assert "BigBrain" in m.spaces.templates
    # with file checks, the example data is (of course) not there
    problems = validate_manifest(path)
    assert any("spaces.templates.BigBrain" in p and "not found" in p for p in problems)
    assert any(p.startswith("subjects[0].sections.files ") and "matches no files" in p
               for p in problems)


def test_valid_real_manifest(tmp_path: Path) -> None:
    make_brain(tmp_path, "B01")
    path = write(tmp_path / "atlas.yaml", VALID)
    assert validate_manifest(path) == []
    m = load_manifest(path)
    assert not m.is_synthetic
    s = m.subject("B01")
    assert s.sections.thickness_um == 20.0 and s.shrinkage == 1.0
    assert m.section_files("B01") == {
        n: tmp_path / "sections" / "B01" / f"B01_s{n:04d}.tif" for n in (1, 16, 31)
    }
    assert m.annotation_files("B01") == {16: tmp_path / "annotations/B01/B01_s0016.png"}
    assert m.stages.registration.preset == "syn"  # defaults fill what the file leaves out
    with pytest.raises(InputError, match=r"no subject 'B09'.*B01"):
        m.subject("B09")


# -- every problem at once, in place ---------------------------------------------------------------

MANY_PROBLEMS = """\
format_version: 1
atlas: {name: test-atlas}
hierarchy: juelich
areas: [hOc1, hOc2]
seeed: 3
spaces:
  reference: [MNI152NLin2009cAsym, MNI152Nlin2009cAsim]
subjects:
  - id: B01
    hemispheres: [left]
    sections:
      files: sections/B01/*.tif
      number_pattern: '_s(\\d+)'
      plane: coronal
      thickness_um: 20
      pixel_size_um: 20
      spacng: 15
    annotations:
      files: [annotations/B01/B01_s0016.png, annotations/B01/B01_s0099.png]
      labels: {1: hOc1_left, 2: hOc2_lft}
  - id: B01
    hemispheres: [left]
    sections:
      files: sections/B02/*.tif
      plane: coronal
      thickness_um: 20
      pixel_size_um: -5
    annotations:
      files: annotations/B02/*.png
      labels: {1: hOc1_left}
"""


def test_all_problems_reported_with_lines(tmp_path: Path) -> None:
    make_brain(tmp_path, "B01")
    make_brain(tmp_path, "B02")
    text = MANY_PROBLEMS
    path = write(tmp_path / "atlas.yaml", text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    problems = info.value.problems
    assert info.value.path == str(path)
    assert validate_manifest(path) == problems

    assert one_problem(problems, "duplicate subject id") == (
        f"subjects[1].id {at(text, '- id: B01', 'B01', 2)}: duplicate subject id 'B01' "
        f"(first at line {line_of(text, '- id: B01')})"
    )
    unknown_space = one_problem(problems, "MNI152Nlin2009cAsim")
    assert unknown_space.startswith(
        f"spaces.reference[1] {at(text, 'MNI152Nlin2009cAsim')}: unknown space"
    )
    assert "did you mean MNI152NLin2009cAsym" in unknown_space
    bad_label = one_problem(problems, "hOc2_lft")
    assert bad_label.startswith(
        f"subjects[0].annotations.labels.2 {at(text, 'hOc2_lft')}: "
    )
    assert "did you mean" in bad_label and "'hOc2_left'" in bad_label
    missing = one_problem(problems, "file not found")
    assert missing.startswith(
        f"subjects[0].annotations.files[1] {at(text, 'annotations/B01/B01_s0099.png')}: "
    )
    assert missing.endswith(str(tmp_path / "annotations/B01/B01_s0099.png"))
    assert one_problem(problems, "annotated section 99 not among the section images").startswith(
        "subjects[0].annotations.files (line"
    )
    assert one_problem(problems, "greater than 0").startswith(
        f"subjects[1].sections.pixel_size_um {at(text, '-5')}: "
    )
    assert one_problem(problems, "'spacng'") == (
        f"subjects[0].sections.spacng {at(text, 'spacng')}: "
        "unknown field 'spacng'; did you mean 'spacing'?"
    )
    assert one_problem(problems, "'seeed'") == (
        "seeed (line 5, col 1): unknown field 'seeed'; did you mean 'seed'?"
    )
    assert len(problems) == 8, "\n".join(problems)
    lines = [int(p.split("(line ")[1].split(",")[0]) for p in problems]
    assert lines == sorted(lines)  # in file order
    assert str(path) in str(info.value) and "8 problems" in str(info.value)


def test_missing_fields_point_at_their_mapping(tmp_path: Path) -> None:
    text = VALID.replace("      plane: coronal\n", "").replace("atlas: {name: test-atlas, ", "x: {")
    path = write(tmp_path / "atlas.yaml", text)
    problems = validate_manifest(path, check_files=False)
    assert one_problem(problems, "'plane'") == (
        f"subjects[0].sections {at(text, 'files: sections')}: "
        "required field 'plane' is missing"
    )
    assert one_problem(problems, "required field 'atlas'").startswith("<top level> (line 1, col 1)")


def test_type_errors_are_explained(tmp_path: Path) -> None:
    text = (VALID.replace('version: "0.1"', "version: 0.1")
            .replace("id: B01", "id: 01")
            .replace("plane: coronal", "plane: frontal")
            .replace("thickness_um: 20", "thickness_um: '20'")
            .replace("[left, right]", "[left, up]")
            .replace("pixel_size_um: 20", "pixel_size_um: .inf"))
    path = write(tmp_path / "atlas.yaml", text)
    problems = validate_manifest(path, check_files=False)
    assert 'write the version in quotes ("0.1")' in one_problem(problems, "atlas.version")
    assert "got the number 1 (put it in quotes)" in one_problem(problems, "subjects[0].id ")
    assert "'coronal', 'sagittal' or 'axial'" in one_problem(problems, "sections.plane")
    assert "got '20'" in one_problem(problems, "thickness_um")
    assert "finite number" in one_problem(problems, "pixel_size_um")
    assert one_problem(problems, "hemispheres[1]").startswith(
        f"subjects[0].hemispheres[1] {at(text, '[left, up]', 'up')}: "
    )


# -- reading the file ----------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    text = "format_version: 1\natlas:\n  name: x\n   version: '1'\nareas: [hOc1]\n"
    path = write(tmp_path / "broken.yaml", text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path} (line 4, col ")
    assert "YAML syntax error" in problem


def test_unclosed_bracket(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.yaml", "format_version: 1\nareas: [hOc1, hOc2\nseed: 1\n")
    (problem,) = validate_manifest(path)
    assert problem.startswith(str(path)) and "YAML syntax error" in problem and "(line " in problem


def test_python_tags_are_rejected_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = VALID.replace(
        "hierarchy: juelich",
        "hierarchy: !!python/object/apply:os.system ['touch pwned']\n"
        "seed: !!python/name:os.getcwd",
    )
    path = write(tmp_path / "evil.yaml", text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path, check_files=False)
    assert not (tmp_path / "pwned").exists()
    problems = info.value.problems
    assert one_problem(problems, "!!python/object/apply:os.system").startswith(
        f"hierarchy {at(text, '!!python/object/apply')}: tag "
    )
    assert "safe loader" in problems[0]
    assert one_problem(problems, "!!python/name:os.getcwd").startswith("seed (line")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "manifest is empty"),
        ("# only a comment\n", "manifest is empty"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("just text\n", "top level must be a mapping"),
        ("a: 1\n---\nb: 2\n", "YAML syntax error"),
    ],
)
def test_not_a_manifest(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "m.yaml", text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    (problem,) = info.value.problems
    assert problem.startswith(str(path)) and expected in problem


def test_missing_manifest_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.problems == [f"{path}: manifest file not found"]
    assert isinstance(info.value, ValueError) and info.value.exit_code == 2
    assert validate_manifest(tmp_path) == [f"{tmp_path}: is a directory, not a manifest file"]


def test_duplicate_yaml_keys_are_reported(tmp_path: Path) -> None:
    text = VALID + "seed: 1\nseed: 2\n"
    path = write(tmp_path / "atlas.yaml", text)
    assert validate_manifest(path, check_files=False) == [
        f"seed {at(text, 'seed: 2', 'seed')}: duplicate key 'seed' "
        f"(first at line {line_of(text, 'seed: 1')}); YAML would silently keep only the last"
    ]


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    path = write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n")
    problems = validate_manifest(path)  # refused before expansion (10**9 nodes would never end)
    assert problems == [one_problem(problems, "YAML aliases")]


# -- paths ---------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    make_brain(project, "B01")
    write(project / "regions" / "tiny.yaml", TINY_HIERARCHY)
    absolute = tmp_path / "elsewhere" / "B01_s0046.tif"  # absolute input paths are allowed
    absolute.parent.mkdir()
    absolute.touch()
    text = (VALID.replace("hierarchy: juelich", "hierarchy: regions/tiny.yaml")
            .replace("areas: [hOc1, hOc2]", "areas: [V1]")
            .replace("files: sections/B01/*.tif", f"files: [sections/B01/*.tif, '{absolute}']")
            .replace(", 2: hOc2_left", ""))
    path = write(project / "atlas.yaml", text)
    monkeypatch.chdir(tmp_path / "elsewhere")  # not the manifest's directory
    m = load_manifest(Path("..") / "project" / "atlas.yaml")
    assert m.path.is_absolute() and m.path.resolve() == path.resolve()
    assert m.resolve("sections/B01/x.tif").resolve() == (project / "sections/B01/x.tif").resolve()
    assert m.resolve(absolute) == absolute
    assert m.hierarchy_source() == m.directory / "regions" / "tiny.yaml"
    assert m.areas == ["hOc1"]  # the alias is stored as the region key
    assert sorted(m.section_files("B01")) == [1, 16, 31, 46]
    assert m.section_files("B01")[46] == absolute

    # the tiny hierarchy has no hOc2: a label for it is a problem, with the hierarchy named
    write(path, text.replace("{1: hOc1_left,", "{1: hOc1_left, 2: hOc2_left,"))
    assert "hOc2_left" in one_problem(validate_manifest(path), "labels.2")
    # and a hierarchy file that is not there
    write(path, text.replace("regions/tiny.yaml", "regions/gone.yaml"))
    problem = one_problem(validate_manifest(path), "hierarchy file not found")
    assert problem.startswith("hierarchy (line 3, col 12): ")
    assert str(project / "regions" / "gone.yaml") in problem


def test_check_files_false_skips_file_checks(tmp_path: Path) -> None:
    text = VALID.replace("files: annotations/B01/*.png", "files: [annotations/B01/B01_s0016.png]")
    path = write(tmp_path / "atlas.yaml", text)  # no files at all
    assert validate_manifest(path, check_files=False) == []
    problems = validate_manifest(path)
    assert one_problem(problems, "matches no files").startswith(
        f"subjects[0].sections.files {at(text, 'sections/B01/*.tif')}: "
        "pattern 'sections/B01/*.tif' matches no files"
    )
    assert one_problem(problems, "file not found").startswith(
        "subjects[0].annotations.files[0] (line"
    )


def test_section_numbering_checks(tmp_path: Path) -> None:
    make_brain(tmp_path, "B01", sections=(1, 16, 31, 46), annotated=(16, 40, 46))
    (tmp_path / "sections/B01/B01_overview.tif").touch()
    text = VALID.replace("      spacing: 15\n", "      spacing: 15\n      missing: [46, 61]\n")
    path = write(tmp_path / "atlas.yaml", text)
    problems = validate_manifest(path)
    assert one_problem(problems, "listed as missing but has an image").startswith(
        f"subjects[0].sections.missing[0] {at(text, 'missing: [46', '46')}: section 46"
    )
    assert "B01_overview.tif" in one_problem(problems, "finds no section number")
    assert one_problem(problems, "not among the section images").endswith(
        "annotated section 40 not among the section images"
    )
    assert one_problem(problems, "listed in sections.missing").endswith(
        "annotated section 46 listed in sections.missing"
    )
    assert len(problems) == 4, "\n".join(problems)


def test_number_pattern_reads_numbers_without_extension(tmp_path: Path) -> None:
    make_brain(tmp_path, "B01")
    for n in (46, 61):
        (tmp_path / f"sections/B01/B01_s{n:04d}.nii.gz").touch()
    default = VALID.replace("      number_pattern: '_s(\\d+)'\n", "").replace("*.tif", "*")
    m = load_manifest(write(tmp_path / "atlas.yaml", default))
    assert sorted(m.section_files("B01")) == [1, 16, 31, 46, 61]  # the last digits, not "01"
    first_digits = VALID.replace("'_s(\\d+)'", "'(\\d+)'")
    (problem,) = validate_manifest(write(tmp_path / "atlas.yaml", first_digits))
    assert problem.startswith(f"subjects[0].sections.files {at(first_digits, 'sections/B01')}: ")
    assert problem.endswith(
        "section 1 appears 3 times: B01_s0001.tif, B01_s0016.tif and B01_s0031.tif "
        "(number_pattern '(\\d+)')"
    )


# -- names ---------------------------------------------------------------------------------------


def test_names_are_checked_and_made_canonical(tmp_path: Path) -> None:
    make_brain(tmp_path, "B01")
    text = (VALID.replace("areas: [hOc1, hOc2]", "areas: [V1, hOc2]")
            .replace("[MNI152NLin2009cAsym]", "['mni152 2009c']"))
    path = write(tmp_path / "atlas.yaml", text)
    m = load_manifest(path)
    assert m.areas == ["hOc1", "hOc2"]
    assert m.spaces.reference == ["MNI152NLin2009cAsym"]

    bad = (text.replace("areas: [V1, hOc2]", "areas: [V1, hOc1, 'hOc2 lef']")
           .replace("id: B01", "id: ../B01")
           .replace("hemispheres: [left, right]", "hemispheres: [left]")
           .replace("atlas: {name: test-atlas", "atlas: {name: /tmp/x"))
    problems = validate_manifest(write(tmp_path / "bad.yaml", bad), check_files=False)
    assert "already listed as areas[0]" in one_problem(problems, "areas[1]")
    assert "did you mean 'hOc2_left'" in one_problem(problems, "areas[2]")
    assert "must start with a letter or digit" in one_problem(problems, "subjects[0].id ")
    assert "must start with a letter or digit" in one_problem(problems, "atlas.name ")
    assert "in the right hemisphere, but this brain has only: left" in one_problem(
        problems, "labels.3"
    )


def test_bigbrain_needs_a_template_for_real_data(tmp_path: Path) -> None:
    text = VALID.replace("[MNI152NLin2009cAsym]", "[MNI152NLin2009cAsym, BigBrain]")
    path = write(tmp_path / "atlas.yaml", text)
    (problem,) = validate_manifest(path, check_files=False)
    assert problem.startswith(f"spaces.reference[1] {at(text, 'BigBrain')}: ")
    assert "spaces.templates.BigBrain" in problem
    with_template = text.replace(
        "spaces:\n", "spaces:\n  templates: {BigBrain: templates/bigbrain.nii.gz}\n"
    )
    path = write(tmp_path / "atlas.yaml", with_template)
    assert validate_manifest(path, check_files=False) == []
    assert load_manifest(path, check_files=False).template_paths() == {
        "BigBrain": tmp_path / "templates" / "bigbrain.nii.gz"
    }


def test_synthetic_and_cohort_rules(tmp_path: Path) -> None:
    demo = builtin_manifest_path("demo").read_text(encoding="utf-8")
    no_brain = demo.replace("reference_brain: true", "reference_brain: false")
    problems = validate_manifest(write(tmp_path / "a.yaml", no_brain))
    assert "synthetic.reference_brain: true" in one_problem(problems, "spaces.reference[1]")
    too_many = demo.replace("quick_subjects: 3", "quick_subjects: 12")
    problems = validate_manifest(write(tmp_path / "b.yaml", too_many))
    assert one_problem(problems, "exceeds").startswith("synthetic.quick_subjects (line")
    both = VALID + "synthetic: {subjects: 4}\n"
    problems = validate_manifest(write(tmp_path / "c.yaml", both), check_files=False)
    assert one_problem(problems, "not both").startswith("subjects (line")
    neither = VALID.split("subjects:")[0]
    problems = validate_manifest(write(tmp_path / "d.yaml", neither))
    assert one_problem(problems, "no brains").startswith("<top level> (line 1, col 1)")


def test_output_locations_cannot_come_from_a_manifest(tmp_path: Path) -> None:
    demo = builtin_manifest_path("demo").read_text(encoding="utf-8")
    text = demo.replace("  annotated_sections: 2", "  annotated_sections: 2\n  cache_dir: /etc")
    text += "output_dir: /tmp/elsewhere\n"
    problems = validate_manifest(write(tmp_path / "m.yaml", text))
    assert "may not choose where files are written" in one_problem(problems, "cache_dir")
    assert "command line (-o)" in one_problem(problems, "output_dir")


def test_precomputed_transforms(tmp_path: Path) -> None:
    make_brain(tmp_path, "B01")
    for name in ("warp.nii.gz", "affine.mat"):
        (tmp_path / name).touch()
    text = VALID.replace("spaces:\n", "spaces:\n  transforms:\n"
                         "    bigbrain->MNI152NLin2009cAsym: {forward: [warp.nii.gz, affine.mat]}\n"
                         "    BigBrain to MNI: {forward: affine.mat, inverse: gone.mat}\n")
    path = write(tmp_path / "atlas.yaml", text)
    problems = validate_manifest(path)
    assert one_problem(problems, "must be 'SOURCE->TARGET'").startswith(
        f"spaces.transforms.BigBrain to MNI {at(text, 'BigBrain to')}: "
    )
    assert one_problem(problems, "gone.mat").startswith("spaces.transforms.BigBrain to MNI.inverse")
    assert len(problems) == 2
    fixed = write(tmp_path / "atlas.yaml", "\n".join(
        ln for ln in text.splitlines() if "BigBrain to" not in ln) + "\n")
    m = load_manifest(fixed)
    assert list(m.spaces.transforms) == ["BigBrain->MNI152NLin2009cAsym"]
    assert m.spaces.transforms["BigBrain->MNI152NLin2009cAsym"].forward == [
        "warp.nii.gz", "affine.mat"
    ]


# -- quick mode ----------------------------------------------------------------------------------


def test_quick_gives_fewer_brains_and_faster_settings() -> None:
    m = load_manifest(builtin_manifest_path("demo"))
    q = m.quick()
    assert q.synthetic is not None and m.synthetic is not None
    assert q.synthetic.subjects == 3 < m.synthetic.subjects == 10
    assert q.stages.segmentation.epochs == QUICK_EPOCHS < m.stages.segmentation.epochs
    assert q.stages.segmentation.width == QUICK_WIDTH < m.stages.segmentation.width
    assert q.stages.segmentation.overlap == QUICK_OVERLAP < m.stages.segmentation.overlap
    assert q.stages.reconstruction.voxel_size_mm > m.stages.reconstruction.voxel_size_mm
    assert q.stages.registration.preset == "synquick"
    assert q.is_quick and not m.is_quick
    assert q.path == m.path and q.areas == m.areas
    assert q.quick() == q  # already quick


def test_manifest_built_in_memory_has_no_path() -> None:
    m = Manifest.model_validate({
        "format_version": 1, "atlas": {"name": "x"}, "areas": ["hOc1"],
        "spaces": {"reference": ["MNI152NLin2009cAsym"]}, "synthetic": {},
    })
    with pytest.raises(InputError, match="not loaded from a file"):
        _ = m.path


def test_segmentation_tile_must_be_a_multiple_of_32(tmp_path: Path) -> None:
    """The prediction window must fit the network (blocks of 4 px, 3 halvings: 32 px)."""
    text = VALID + "stages:\n  segmentation: {tile: 200, tta: true}\n"
    path = write(tmp_path / "atlas.yaml", text)
    problem = one_problem(validate_manifest(path, check_files=False), "tile")
    assert problem.startswith(f"stages.segmentation.tile {at(text, 'tile: 200', '200')}: ")
    assert "multiple of 32" in problem
    ok = write(tmp_path / "ok.yaml", VALID + "stages:\n  segmentation: {tile: 256, tta: true}\n")
    seg = load_manifest(ok, check_files=False).stages.segmentation
    assert (seg.tile, seg.tta) == (256, True)


def test_registration_resolution(tmp_path: Path) -> None:
    text = VALID + "stages:\n  registration: {preset: rigid, resolution_mm: 0}\n"
    problem = one_problem(validate_manifest(write(tmp_path / "a.yaml", text), check_files=False),
                          "resolution_mm")
    assert problem.startswith("stages.registration.resolution_mm (line ") and "greater than 0" in problem
    ok = write(tmp_path / "ok.yaml", VALID + "stages:\n  registration: {resolution_mm: 4}\n")
    assert load_manifest(ok, check_files=False).stages.registration.resolution_mm == 4.0
    assert load_manifest(write(tmp_path / "d.yaml", VALID), check_files=False
                         ).stages.registration.resolution_mm is None  # the preset's
