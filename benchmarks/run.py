"""kbtune's performance benchmarks in one command: prints a table and writes JSON.

    .venv/bin/python benchmarks/run.py [--quick] [--only training,data,startup,...] [--out PATH]

Sections: training (kbtune vs a plain PyTorch loop vs transformers.Trainer; MFU), knowledge (the fact-probe
evaluation vs the training it follows), recipe (experiment=knowledge vs the defaults and each data option
alone on 100 planted entities at equal exposures; ~30 min), update (an incremental update vs a full
retrain after the KB changed; ~15 min), data (preparation vs the raw limit, the real cached rerun, peak
RSS), data_scale (the same at 1,000,000 documents in fresh processes; the KB takes ~15 min to build
once), startup (`kbtune --help`, cold and warm first optimizer step vs bare imports, tokenizer training
vs loading), e2e (3 epochs of model=small on the sample KB), generation (streamed greedy decoding vs
`model.generate`, time to first token through the API). Within a section the variants run
interleaved (the order rotating each round) and each figure is a median with min..max and its ratio
to the baseline. `--quick` runs everything at toy size (a check that the benchmarks work, not a
measurement).

The JSON goes to benchmarks/results/<UTC date>-<machine>.json (with -quick or the sections in the
name for a quick or partial run, so neither overwrites a full run); a full run's JSON is committed
and `benchmarks/readme_table.py` writes the README's table from it.

Knowledge bases, tokenizers and scratch files live under --workdir (built once, reused)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import harness

SECTIONS = {
    "training": "training",
    "profile": "profile_step",
    "mfu": "mfu",
    "data": "data_prep",
    "data_scale": "data_scale",
    "startup": "startup",
    "e2e": "e2e",
    "knowledge": "knowledge",
    "recipe": "recipe",
    "update": "update",
    "generation": "generation",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the benchmarks run (~4 min)")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections ({', '.join(SECTIONS)})"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="the JSON to write (default: benchmarks/results/<UTC date>-<machine>.json, the file to commit)",
    )
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "kbtune-bench"))
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per comparison (default: 3, quick: 1-2)"
    )
    args = parser.parse_args(argv)
    unknown = [s for s in args.only.split(",") if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown sections {unknown} (known: {', '.join(SECTIONS)})")
    return args


def default_out(now: datetime, machine: dict, quick: bool = False, sections: list[str] | None = None) -> Path:
    """benchmarks/results/<YYYY-MM-DD>-<machine slug>.json: the run's UTC date and the machine it ran
    on; a partial (--only) or quick run adds its sections or `quick`, so it never replaces a full run."""
    name = f"{now:%Y-%m-%d}-{machine['slug']}"
    if sections is not None and set(sections) != set(SECTIONS):
        name += "-" + "+".join(sections)
    return harness.REPO / "benchmarks" / "results" / f"{name}{'-quick' if quick else ''}.json"


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # What kbtune's own entry points set; the benchmarks measure kbtune as its users run it.
    for key, value in {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                       "TOKENIZERS_PARALLELISM": "false"}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    workdir = Path(args.workdir) / ("quick" if args.quick else "full")
    workdir.mkdir(parents=True, exist_ok=True)
    now, machine = datetime.now(timezone.utc), harness.machine()
    out = Path(args.out) if args.out else default_out(now, machine, args.quick, args.only.split(","))
    started = time.perf_counter()
    report: dict = {
        "meta": {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "quick": args.quick, "started": now.isoformat(timespec="seconds"),
            "machine": machine, "commit": harness.commit(), "workdir": str(workdir), "load_before": harness.other_load(),
        },
        "sections": {},
    }  # fmt: skip
    failed = []
    for name in args.only.split(","):
        harness.log(f"== {name}")
        t0 = time.perf_counter()
        try:
            result = importlib.import_module(SECTIONS[name]).run(workdir, args.quick, args.rounds)
        except Exception:
            failed.append(name)
            result = {"error": traceback.format_exc(), "rows": [], "targets": []}
            harness.log(result["error"])
        result["seconds"] = time.perf_counter() - t0
        report["sections"][name] = result
        write(report, out)
    report["meta"]["load_after"] = harness.other_load()
    report["meta"]["seconds"] = time.perf_counter() - started
    write(report, out)
    print(harness.render(report))
    print(f"\n{report['meta']['seconds']:.0f}s in all; JSON: {out}")
    if failed:
        print(f"FAILED sections: {', '.join(failed)} (tracebacks in the JSON)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
