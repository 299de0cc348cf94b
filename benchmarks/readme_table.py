"""The README's performance table, generated from a results JSON (never typed by hand).

    .venv/bin/python benchmarks/readme_table.py [RESULTS_JSON ...] [--check] [--readme README.md]

Writes the block between `<!-- bench-table:begin -->` and `<!-- bench-table:end -->` in README.md: a line
naming the run (date, CPU, cores, CPU flags, whether the machine was quiet, the results file), the main
table (`| comparison | result | target |`) from every section's `readme` rows in section order, then
each section's extra `readme_tables`. Without RESULTS_JSON it uses the newest benchmarks/results/*.json
of a full-size run (it has `meta`, is not `--quick`, and carries readme rows) on top of the runs the
README's table names when it is of the same machine (else alone). Several files (runs of
some sections each, on one machine: the same CPU model and core count, else it refuses) make one table:
a section in a later file replaces the same section of an earlier one, and a line per run names its
file and its sections. Every comparison is still within one run: a section's variants always run
together. `--check` changes nothing: it exits 1 with a diff when the README's block is not what the
JSONs generate (without RESULTS_JSON: the JSONs the block names as its sources).

What a section provides (report["sections"][name]), each row formatted by the section from its own figures:
  "readme": [{"comparison": str, "result": str, "target": str, "met": true/false/null (optional)}]
  "readme_tables": [{"title": str, "header": [str, ...], "rows": [[str, ...], ...], "note": str}]"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"
COMMAND = "benchmarks/readme_table.py"


class TableError(Exception):
    """The README or the results cannot give a table (exit status 2)."""


def load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("meta"), dict) else None


def has_readme_rows(report: dict[str, Any]) -> bool:
    return any(isinstance(s, dict) and s.get("readme") for s in report.get("sections", {}).values())


def newest_results(directory: Path = RESULTS) -> Path:
    """The newest full-size run's JSON (by its start time, then the file's): it has meta, is not quick,
    and has readme rows (results written before sections provided them have none)."""
    found = []
    for path in directory.glob("*.json"):
        report = load(path)
        if report is None or report["meta"].get("quick") or not has_readme_rows(report):
            continue
        found.append((str(report["meta"].get("started") or ""), path.stat().st_mtime, path))
    if not found:
        raise TableError(
            f"no results JSON of a full-size run with readme rows in {directory}: run benchmarks/run.py first"
        )
    return max(found)[2]


def cell(text: Any) -> str:
    """Table cells are one line and must not end the cell early."""
    return " ".join(str(text).split()).replace("|", "\\|")


def shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def quiet_text(meta: dict[str, Any]) -> str:
    def state(load: dict[str, Any] | None) -> str:
        if not load:
            return "not recorded"
        if load.get("quiet"):
            return "quiet"
        return f"NOT quiet ({load.get('other_cpu_percent')}% CPU in other processes)"

    before, after = state(meta.get("load_before")), state(meta.get("load_after"))
    return (
        f"machine {before} before and after" if before == after else f"machine {before} before, {after} after"
    )


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def target_cell(row: dict[str, Any]) -> str:
    text = str(row.get("target") or "")
    met = row.get("met")
    if met is None:
        return text
    return f"{text} **{'met' if met else 'not met'}**".strip()


def run_line(meta: dict[str, Any], path: Path, sections: list[str] | None = None) -> str:
    machine = meta.get("machine", {})
    flags = ", ".join(machine.get("flags") or []) or "none of the matmul flags"
    date = str(meta.get("started", "?"))[:10]
    quick = " **quick run: toy sizes, not a measurement**;" if meta.get("quick") else ""
    which = f" (sections: {', '.join(sections)})" if sections is not None else ""
    return (f"Run of {date} on {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores ({flags});{quick} "
            f"{quiet_text(meta)}; results `{shown_path(path)}`{which}.")  # fmt: skip


def merged(runs: list[tuple[dict[str, Any], Path]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every section, a later run's replacing an earlier one's; and a line per run that gave one."""
    machines = {(r["meta"].get("machine", {}).get("cpu"), r["meta"].get("machine", {}).get("cores")) for r, _ in runs}
    if len(machines) > 1:
        raise TableError(f"the results come from different machines {sorted(map(str, machines))}: one table "
                         "compares one machine's runs")  # fmt: skip
    sections: dict[str, dict[str, Any]] = {}
    source: dict[str, int] = {}
    for k, (report, _) in enumerate(runs):
        for name, section in report.get("sections", {}).items():
            sections[name] = section
            source[name] = k
    if len(runs) == 1:
        return sections, [run_line(runs[0][0]["meta"], runs[0][1])]
    lines = [run_line(report["meta"], path, [n for n in sections if source[n] == k])
             for k, (report, path) in enumerate(runs) if k in source.values()]  # fmt: skip
    return sections, lines


def render(report: dict[str, Any] | list[tuple[dict[str, Any], Path]], path: Path | None = None) -> str:
    """The block between the markers (markers included), from one report and its path, or from a list
    of (report, path) runs."""
    runs = report if isinstance(report, list) else [(report, path)]
    sections, run_lines = merged(runs)  # type: ignore[arg-type]
    rows, failed, extra = [], [], []
    for name, section in sections.items():
        if section.get("error"):
            failed.append(name)
        for row in section.get("readme") or []:
            rows.append([row["comparison"], row["result"], target_cell(row)])
        for t in section.get("readme_tables") or []:
            extra += ["", f"**{cell(t['title'])}**", "", *table(t["header"], t["rows"])]
            if t.get("note"):
                extra += ["", cell(t["note"])]
    names = ", ".join(shown_path(p) for _, p in runs)
    lines = [BEGIN, f"<!-- generated by {COMMAND} from {names}: edit the benchmarks, not this block -->",
             "\n\n".join(run_lines), "",
             *table(["comparison", "result", "target"], rows)]  # fmt: skip
    if failed:
        lines += ["", f"Sections that failed in this run (tracebacks in the JSON): {', '.join(failed)}."]
    return "\n".join([*lines, *extra, END])


def current_block(readme: str) -> tuple[int, int]:
    """(start, end) of the block in the README, markers included."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise TableError(f"the README must hold {BEGIN} and {END} once each")
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    if end < start:
        raise TableError(f"{END} comes before {BEGIN} in the README")
    return start, end


def named_sources(block: str) -> list[Path]:
    """The results files a generated block says it came from (its first comment line)."""
    marker = f"<!-- generated by {COMMAND} from "
    if marker not in block:
        return []
    names = block.split(marker, 1)[1].split(": edit the benchmarks", 1)[0]
    return [Path(n) if Path(n).is_absolute() else REPO / n for n in names.split(", ")]


def machine_of(path: Path) -> tuple[Any, Any] | None:
    report = load(path)
    machine = report["meta"].get("machine", {}) if report else None
    return (machine.get("cpu"), machine.get("cores")) if machine is not None else None


def default_runs(named: list[Path], directory: Path = RESULTS) -> list[Path]:
    """What a write without RESULTS_JSON uses: the runs the README names, with the newest run on top
    of them when it is of the same machine (a rerun of some sections replaces only those), else the
    newest run alone."""
    newest = newest_results(directory)
    named = [p for p in named if p.exists()]
    if not named or any(p.resolve() == newest.resolve() for p in named):
        return named or [newest]
    return [*named, newest] if machine_of(newest) == machine_of(named[0]) else [newest]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="*", help="results JSONs, later sections replacing earlier ones "
                        "(default: the newest full-size run's)")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 with a diff if the README's block differs"
    )
    parser.add_argument("--readme", default=str(REPO / "README.md"), help="the README to write or check")
    args = parser.parse_args(argv)
    try:
        readme_path = Path(args.readme)
        readme = readme_path.read_text()
        start, end = current_block(readme)
        # --check alone checks the block against the file it names (a later partial run, say of one
        # section, does not replace the run the README quotes); writing alone takes the newest run.
        named = named_sources(readme[start:end])
        if args.results:
            paths = [Path(r) for r in args.results]
        else:
            paths = named if args.check else default_runs(named)
        runs = []
        for path in paths:
            report = load(path)
            if report is None:
                raise TableError(f"{path} is not a results JSON (no meta)")
            runs.append((report, path))
        block = render(runs)
    except (TableError, OSError) as exc:
        print(f"readme_table: {exc}", file=sys.stderr)
        return 2
    shown = ", ".join(shown_path(p) for p in paths)
    if args.check:
        if readme[start:end] == block:
            print(f"{readme_path}: the performance table is what {shown} generates")
            return 0
        diff = difflib.unified_diff(readme[start:end].splitlines(), block.splitlines(),
                                    f"{readme_path} (now)", f"generated from {shown}", lineterm="")  # fmt: skip
        print("\n".join(diff))
        print(
            f"\n{readme_path}: the performance table differs; run {COMMAND} {' '.join(shown_path(p) for p in paths)}",
            file=sys.stderr,
        )
        return 1
    updated = readme[:start] + block + readme[end:]
    if updated != readme:
        readme_path.write_text(updated)
        print(f"{readme_path}: performance table written from {shown}")
    else:
        print(f"{readme_path}: the performance table already matches {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
