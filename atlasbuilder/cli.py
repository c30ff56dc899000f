"""The ``atlasbuilder`` command line: argument parsing and error mapping only.

Every command's work lives in the library; this module turns arguments into calls and errors into
one clean line on stderr with an exit code: 0 ok, 2 bad input or usage, 1 failure while working.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AtlasBuilderError, InputError, ManifestError

log = logging.getLogger("atlasbuilder")

# argparse treats "-10" as a number only when no option looks like one; extend its idea of a
# negative number to the forms coordinates take ("-1e3", "-.5", "-10.")
_NEG_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEG_NUMBER


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="only errors")
    g.add_argument("-v", "--verbose", action="store_true", help="debug messages")


# the build's stages (kept in sync with pipeline.STAGES by a test; not imported: --help stays light)
_STAGE_NAMES = ("synthesize", "segmentation", "reconstruction", "registration", "aggregation",
                "exports")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="atlasbuilder",
        description="Build probabilistic cytoarchitectonic brain atlases and query them.",
        epilog="Run 'atlasbuilder COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"atlasbuilder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("build", help="build an atlas from a manifest",
                       description="Validate MANIFEST and run the build's stages into -o DIR.")
    p.add_argument("manifest", type=Path)
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="atlas directory (default: ./<atlas name>)")
    p.add_argument("--quick", action="store_true",
                   help="small cohort and fast settings (the demo in minutes)")
    p.add_argument("--force", nargs="?", const=True, default=False, metavar="STAGE", type=_stage_name,
                   help="recompute everything (and write into a non-empty directory), or only "
                        f"STAGE ({', '.join(_STAGE_NAMES)})")
    p.add_argument("--until", choices=_STAGE_NAMES, default=None, metavar="STAGE",
                   help="stop after STAGE")
    p.add_argument("--workers", type=int, default=None,
                   help="local worker processes (default: the machine's cores, at most 4; "
                        "1 runs without Dask)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on an existing dask.distributed scheduler, e.g. tcp://host:8786")
    _add_common(p)

    p = sub.add_parser(
        "segment", help="map the areas in every section of a manifest's brains (CNN)",
        description="Train on each brain's annotated sections and predict every section into "
                    "DIR/<subject>/ (section label and probability maps, segmentation.json). "
                    "Already predicted sections are skipped on a rerun.")
    p.add_argument("manifest", type=Path)
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="output directory (default: ./<atlas name>-segmentation)")
    p.add_argument("--subject", action="append", default=None, metavar="ID",
                   help="only this brain (repeat for several; default: all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quick", action="store_true", help="the quick settings (and demo cohort)")
    _add_common(p)

    p = sub.add_parser(
        "synth", help="generate the synthetic demo cohort (sections, annotations, truth)",
        description="Write OUTDIR/manifest.yaml, the section and annotation images, a reference "
                    "brain (the demo's BigBrain) and OUTDIR/truth/ (never read by the build).")
    p.add_argument("outdir", type=Path)
    p.add_argument("--subjects", type=int, default=10, help="brains in the cohort (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="at most 3 brains, coarser section spacing (generates in about a minute)")
    p.add_argument("--areas", nargs="+", default=None, metavar="AREA",
                   help="areas to generate (default: hOc1 hOc2 hOc3v hOc4v hOc5)")
    p.add_argument("--no-reference", action="store_true", help="no reference (BigBrain) brain")
    p.add_argument("--contact-sheet", action="store_true",
                   help="also write OUTDIR/contact_sheet.png (sections with annotation contours)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--force", action="store_true", help="replace an existing OUTDIR")
    _add_common(p)

    p = sub.add_parser("validate", help="check a manifest and report every problem at once")
    p.add_argument("manifest", type=Path)
    p.add_argument("--no-file-checks", action="store_true",
                   help="check the schema only, not that input files exist")
    _add_common(p)

    p = sub.add_parser(
        "import", help="import an existing probabilistic atlas (4-D NIfTI + label table)",
        description="Turn a 4-D NIfTI of probability maps (0-1 or 0-100, detected) and a label "
                    "table (CSV/TSV index,name or FSL XML) into an atlas directory.")
    p.add_argument("pmaps", type=Path, help="4-D NIfTI, one map per volume")
    p.add_argument("labels", type=Path, help="label table, one row per volume")
    p.add_argument("-o", "--output", type=Path, required=True, help="atlas directory to write")
    p.add_argument("--space", required=True, help="space of the maps, e.g. MNI152NLin6Asym")
    p.add_argument("--hierarchy", default="auto",
                   help="'auto' (default), 'flat', a built-in name (juelich) or a YAML/JSON file")
    p.add_argument("--name", help="atlas name (default: the file name)")
    p.add_argument("--scale", choices=["auto", "fraction", "percent"], default="auto")
    p.add_argument("--resample", action="store_true",
                   help="resample a rotated/sheared image onto an axis-aligned grid")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    _add_common(p)

    p = sub.add_parser(
        "query", help="which regions are at a coordinate, with what probability",
        description="Regions at a point (nearest voxel). Coordinates in mm; negative values "
                    "work as typed: atlasbuilder query DIR -10 -90 0")
    p.add_argument("atlas", type=Path, help="atlas directory")
    p.add_argument("coords", nargs="*", type=_number, metavar="X Y Z",
                   help="a point in mm (omit when using --points)")
    p.add_argument("--points", type=Path, help="CSV file with columns x,y,z (one point a row)")
    p.add_argument("--space", help="space of the coordinates (default: the atlas's first)")
    p.add_argument("--min-probability", type=_probability, default=0.05,
                   help="leave out regions below this probability (default 0.05)")
    p.add_argument("--sigma", type=float, default=None, metavar="MM",
                   help="positional uncertainty: Gaussian sigma in mm (0 < sigma <= 50); each "
                        "area also gets the fraction of the point's mass inside it")
    p.add_argument("--level", default=None,
                   help="answer at a hierarchy level (area, group, lobe, ...): parents sum "
                        "their areas")
    p.add_argument("--to", action="append", default=None, metavar="SPACE",
                   help="map the points into SPACE through the build's transforms (repeatable); "
                        "BigBrain adds the reference brain's section and pixel")
    p.add_argument("--json", action="store_true", help="one JSON object per point")
    _add_common(p)

    p = sub.add_parser(
        "stats", help="variability statistics: volumes, asymmetry, Dice, cross-validation",
        description="The tables the build wrote to DIR/stats/ (per brain and area volumes and "
                    "centroids, per area summaries, asymmetry, inter-brain Dice, leave-one-out).")
    p.add_argument("atlas", type=Path, help="atlas directory")
    p.add_argument("--region", default=None, help="only this region (a parent selects its areas)")
    p.add_argument("--json", action="store_true", help="the tables as one JSON object")
    _add_common(p)

    p = sub.add_parser("regions", help="list or search the atlas's region hierarchy")
    p.add_argument("source", help="atlas directory, hierarchy file or built-in name (juelich)")
    p.add_argument("--tree", action="store_true", help="print the hierarchy as a tree")
    p.add_argument("--find", metavar="TEXT",
                   help="find regions by name/alias/words ('re:PATTERN' for a regex)")
    p.add_argument("--json", action="store_true")
    _add_common(p)

    p = sub.add_parser("spaces", help="list the known reference spaces and their templates")
    _add_common(p)
    p = sub.add_parser("export", help="write files other tools open: NIfTI bundle or siibra configuration",
                       description="Write the NIfTI bundle (DIR/maps/<space>/...) or a siibra "
                                   "configuration with absolute paths (DIR/siibra/) of an atlas.")
    p.add_argument("kind", choices=("nifti", "siibra"))
    p.add_argument("atlas", type=Path, metavar="DIR", help="atlas directory")
    p.add_argument("--to", type=Path, default=None, metavar="PATH",
                   help="output folder (default: DIR/maps or DIR/siibra)")
    _add_common(p)

    p = sub.add_parser("report", help="write the atlas's self-contained HTML report",
                       description="Write DIR/report.html: maps over the template, hierarchy with "
                                   "volumes, variability and QA figures, provenance.")
    p.add_argument("atlas", type=Path, metavar="DIR", help="atlas directory")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="report file (default: DIR/report.html)")
    _add_common(p)

    p = sub.add_parser("view", help="serve the atlas's web viewer on 127.0.0.1",
                       description="Serve a NiiVue page (template, MPM, probability maps, region "
                                   "picker, click to query) on http://127.0.0.1:PORT/ until Ctrl+C.")
    p.add_argument("atlas", type=Path, metavar="DIR", help="atlas directory")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 = any free one)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    _add_common(p)

    return parser


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return v


def _probability(text: str) -> float:
    v = _number(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be within 0..1, got {text}")
    return v


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)
    log.handlers[:] = [handler]
    log.setLevel(min(level, logging.INFO))  # INFO still reaches the build's log file
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``atlasbuilder`` command. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return int(_COMMANDS[args.command](args) or 0)
    except ManifestError as exc:
        print(f"atlasbuilder {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except AtlasBuilderError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"atlasbuilder {args.command}: error: {msg}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("atlasbuilder: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `atlasbuilder query ... | head`
        return 0


# -- commands ----------------------------------------------------------------------------------
def _stage_name(value: str) -> str:
    """``--force STAGE``: one of the build's stages (argparse turns the error into exit code 2)."""
    if value not in _STAGE_NAMES:
        raise argparse.ArgumentTypeError(f"invalid stage {value!r} (choose from {', '.join(_STAGE_NAMES)})")
    return value


def _cmd_build(args: argparse.Namespace) -> int:
    from .pipeline import build

    out = build(args.manifest, args.output, quick=args.quick, force=args.force, until=args.until,
                workers=args.workers, scheduler=args.scheduler, progress=not args.quiet)
    log.info("atlas written to %s", out)
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from .segmentation.stage import segment

    out = segment(args.manifest, args.output, subjects=args.subject, device=args.device,
                  quick=args.quick, progress=not args.quiet)
    log.info("section maps written to %s", out)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synthetic.cohort import CohortSettings, generate_cohort

    if args.subjects < 1:
        raise InputError(f"--subjects must be at least 1, got {args.subjects}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    settings = CohortSettings(subjects=args.subjects, seed=args.seed,
                              reference_brain=not args.no_reference, workers=max(1, args.workers))
    if args.areas:
        from .regions import load_hierarchy

        tree = load_hierarchy("juelich")
        settings = replace(settings, areas=tuple(tree.get(a).key for a in args.areas))
    if args.quick:
        settings = settings.quick()
    manifest = generate_cohort(args.outdir, settings, progress=not args.quiet,
                               contact_sheet=args.contact_sheet, force=args.force)
    log.info("demo cohort written: %s (truth in %s)", manifest, args.outdir / "truth")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .manifest import validate_manifest

    problems = validate_manifest(args.manifest, check_files=not args.no_file_checks)
    if problems:
        raise ManifestError(args.manifest, problems)
    print(f"{args.manifest}: valid")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from .importing import import_atlas

    out = import_atlas(args.pmaps, args.labels, args.output, space=args.space,
                       hierarchy=args.hierarchy, name=args.name, scale=args.scale,
                       resample=args.resample, force=args.force)
    from .atlas import load_atlas

    atlas = load_atlas(out)
    sm = atlas.space_maps()
    log.info("imported %d maps (%s, stored as %s) on a %s grid in %s into %s",
             len(sm.region_ids), atlas.meta.get("probability_scale"), sm.dtype,
             "x".join(map(str, sm.grid.shape)), sm.space, out)
    return 0


def _read_points(path: Path) -> list[list[float]]:
    import csv

    if not path.is_file():
        from .errors import MissingFileError

        raise MissingFileError(path, "points file")
    text = path.read_text(encoding="utf-8-sig")
    delim = "\t" if "\t" in text.split("\n", 1)[0] else ","
    rows = [r for r in csv.reader(text.splitlines(), delimiter=delim) if any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"{path}: no points")
    header = [c.strip().lower() for c in rows[0]]
    cols = [0, 1, 2]
    start = 0
    if not all(_is_number(c) for c in rows[0][:3]):
        try:
            cols = [header.index(a) for a in ("x", "y", "z")]
        except ValueError:
            raise InputError(f"{path}: expected columns x,y,z, found {rows[0]}") from None
        start = 1
    pts = []
    for n, r in enumerate(rows[start:], start=start + 1):
        try:
            pts.append([float(r[c]) for c in cols])
        except (ValueError, IndexError):
            raise InputError(f"{path}: line {n}: expected three numbers x,y,z, got {r}") from None
    return pts


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _cmd_query(args: argparse.Namespace) -> int:
    from .atlas import load_atlas

    if args.points is not None and args.coords:
        raise InputError("give either X Y Z or --points, not both")
    if args.points is None and len(args.coords) != 3:
        raise InputError(f"expected three coordinates X Y Z, got {len(args.coords)}")
    points = _read_points(args.points) if args.points is not None else [args.coords]
    atlas = load_atlas(args.atlas)
    out = sys.stdout
    if args.to:
        from .atlas import format_located

        located = atlas.locate(points, args.space, to=args.to)
        out.write("".join(json.dumps(a) + "\n" for a in located) if args.json
                  else format_located(located))
        return 0
    opts = {"min_probability": args.min_probability, "level": args.level, "sigma_mm": args.sigma}
    if args.json:
        out.write(atlas.query_json_lines(points, args.space, **opts))
        return 0
    answers = atlas.query(points, args.space, **opts)
    lines = []
    for a in answers:
        x, y, z = a["point"]
        lines.append(f"{a['space']} ({x:g}, {y:g}, {z:g}):")
        if a.get("outside"):
            lines.append("  outside the atlas volume")
        elif not a["regions"]:
            lines.append(f"  no region with probability >= {args.min_probability:g}")
        for r in a["regions"]:
            mass = f"  (mass inside {r['mass_inside']:.2f})" if "mass_inside" in r else ""
            lines.append(f"  {r['probability']:5.2f}  {r['name']}  [{r['key']}]{mass}")
    out.write("\n".join(lines) + "\n")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.kind == "nifti":
        from .export.nifti import export_nifti

        out = export_nifti(args.atlas, args.to)
    else:
        from .export.siibra import write_siibra_configuration

        out = write_siibra_configuration(args.atlas, args.to)
    log.info("%s export written to %s", args.kind, out)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = write_report(args.atlas, args.output)
    log.info("report written to %s", out)
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    from .export.viewer import serve_viewer

    serve_viewer(args.atlas, args.port, not args.no_browser)
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from .atlas import format_statistics, load_atlas

    tables = load_atlas(args.atlas).statistics(args.region)
    if args.json:
        doc = {k: json.loads(v.to_json(orient="records")) for k, v in tables.items()}
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        sys.stdout.write(format_statistics(tables))
    return 0


def _tree_for(source: str) -> Any:
    from .regions import BUILTIN_HIERARCHIES, load_hierarchy

    p = Path(source)
    if p.is_dir():
        from .atlas import load_atlas

        return load_atlas(p).regions
    if source in BUILTIN_HIERARCHIES or p.is_file():
        return load_hierarchy(source)
    from .errors import MissingFileError

    raise MissingFileError(source, "atlas directory or hierarchy file")


def _cmd_regions(args: argparse.Namespace) -> int:
    tree = _tree_for(args.source)
    if args.find:
        found = tree.find(args.find)
        if not found:
            from .errors import UnknownRegionError

            raise UnknownRegionError(f"no region matches {args.find!r}", tree.suggest(args.find))
        regions = found
    else:
        regions = list(tree)
    if args.json:
        print(json.dumps([dict(r.to_dict(), parent=r.parent) for r in regions], indent=1))
    elif args.tree and not args.find:
        for depth, r in tree.walk():
            print(f"{'  ' * depth}{r.name}  [{r.key}, id {r.id}]")
    else:
        for r in regions:
            lvl = f" {r.level}" if r.level else ""
            print(f"{r.id:>6}  {r.key:<28} {r.name}{lvl and '  (' + lvl.strip() + ')'}")
    return 0


def _cmd_spaces(args: argparse.Namespace) -> int:
    from .spaces import list_spaces

    for s in list_spaces():
        try:
            where = str(s.template_path())
        except AtlasBuilderError as exc:
            where = f"({str(exc).split(' (')[0]})"
        print(f"{s.name:<22} {s.description}\n{'':<22} aliases: {', '.join(s.aliases)}\n"
              f"{'':<22} template: {where}")
    print(f"{'subject:<id>':<22} the native space of one brain (its reconstruction)")
    return 0


_COMMANDS = {
    "build": _cmd_build,
    "segment": _cmd_segment,
    "synth": _cmd_synth,
    "validate": _cmd_validate,
    "import": _cmd_import,
    "query": _cmd_query,
    "stats": _cmd_stats,
    "export": _cmd_export,
    "report": _cmd_report,
    "view": _cmd_view,
    "regions": _cmd_regions,
    "spaces": _cmd_spaces,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
