"""How every benchmark measures and reports: variants run interleaved (A B C A B C ...) so machine
drift lands on all of them alike, each summarised as median / min / max with its ratio to a baseline,
targets checked against those ratios, and one printed table for the whole run."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def log(message: str) -> None:
    """Progress goes to stderr; the table and the JSON are the results."""
    print(message, file=sys.stderr, flush=True)


def interleave(
    variants: dict[str, Callable[[], dict[str, float]]], rounds: int, label: str = ""
) -> dict[str, list[dict[str, float]]]:
    """Run each variant once per round and return each one's samples. The order rotates: round r
    starts at variant r mod n (A B C, B C A, C A B, ...), so no variant always runs first (cold
    caches) or always right after the same neighbour."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        log(f"  [{label}] round {r + 1}/{rounds} order: {', '.join(order)}")
        for name in order:
            samples[name].append(_sample(variants[name], f"[{label}] round {r + 1}/{rounds} {name}"))
    return samples


def interleave_pairs(
    pairs: dict[str, dict[str, Callable[[], dict[str, float]]]], rounds: int, label: str = ""
) -> dict[str, list[dict[str, float]]]:
    """Each pair's two variants run back to back in every round, so `paired_ratio` divides runs taken
    seconds apart, not minutes: on a shared VM the speed drifts by 25% over minutes (2-core AMD EPYC,
    2026-12-03), and a ratio of medians over rounds minutes apart measures that drift as much as the
    variants. Which of the two runs first alternates between rounds and between neighbouring pairs;
    the pairs' order rotates as in `interleave`. Samples are keyed "<pair> <variant>"."""
    samples = {f"{cell} {name}": [] for cell, two in pairs.items() for name in two}
    cells = list(pairs)
    if any(len(two) != 2 for two in pairs.values()):
        raise ValueError(f"every pair needs exactly two variants: {({c: list(t) for c, t in pairs.items()})}")
    for r in range(rounds):
        order = cells[r % len(cells) :] + cells[: r % len(cells)]
        log(f"  [{label}] round {r + 1}/{rounds}")
        for cell in order:
            names = list(pairs[cell])
            if (r + cells.index(cell)) % 2:
                names.reverse()
            for name in names:
                key = f"{cell} {name}"
                samples[key].append(_sample(pairs[cell][name], f"[{label}] round {r + 1}/{rounds} {key}"))
    return samples


def _sample(variant: Callable[[], dict[str, float]], what: str) -> dict[str, float]:
    """One run of a variant, with the share of CPU time the hypervisor took from this VM meanwhile
    (`steal_percent`, from /proc/stat; absent where the kernel does not count it): a noisy run shows."""
    before, t0 = _cpu_times(), time.perf_counter()
    sample = dict(variant())
    after = _cpu_times()
    if before and after and after[1] > before[1]:
        sample["steal_percent"] = 100 * (after[0] - before[0]) / (after[1] - before[1])
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sample.items() if isinstance(v, (int, float)))
    log(f"  {what}: {shown} ({time.perf_counter() - t0:.1f}s)")
    return sample


def _cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs since boot, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user and nice]
    ticks = [int(x) for x in fields[1:9]]
    return ticks[7], sum(ticks)


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def summarise(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{variant: {metric: summary}} over every numeric metric the samples share."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, runs in samples.items():
        keys = [k for k in runs[0] if all(isinstance(r.get(k), (int, float)) for r in runs)]
        out[name] = {k: summary([float(r[k]) for r in runs]) for k in keys}
    return out


def ratio(summaries: dict[str, dict[str, dict[str, Any]]], variant: str, baseline: str, metric: str) -> float:
    return summaries[variant][metric]["median"] / summaries[baseline][metric]["median"]


def paired_ratio(samples: dict[str, list[dict[str, float]]], variant: str, baseline: str, metric: str) -> dict[str, Any]:
    """The summary (median, min, max) of variant / baseline taken round by round: for variants that ran
    back to back (`interleave_pairs`)."""
    a, b = samples[variant], samples[baseline]
    if len(a) != len(b) or not a:
        raise ValueError(f"{variant} has {len(a)} samples and {baseline} {len(b)}: no pairs to divide")
    return summary([x[metric] / y[metric] for x, y in zip(a, b, strict=True)])


def row(section: str, comparison: str, variant: str, metric: str, unit: str, stats: dict[str, Any],
        baseline: dict[str, Any] | None = None, baseline_name: str = "") -> dict[str, Any]:  # fmt: skip
    """One table line: a metric's median and spread, and its ratio to the baseline's median."""
    return {
        "section": section, "comparison": comparison, "variant": variant, "metric": metric, "unit": unit,
        "median": stats["median"], "min": stats["min"], "max": stats["max"], "n": len(stats["values"]),
        "ratio": stats["median"] / baseline["median"] if baseline else None, "baseline": baseline_name or None,
        # Which printed figure the ratio divides by: the median of the row named by `baseline`.
        "baseline_median": baseline["median"] if baseline else None,
    }  # fmt: skip


def target(name: str, value: float | None, op: str, threshold: float, baseline: str = "") -> dict[str, Any]:
    """A target from the issue, checked on this run's numbers (None when the run did not measure it)."""
    met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "baseline": baseline, "met": met}


def all_met(targets: list[dict[str, Any]]) -> bool | None:
    """Whether every one of `targets` was met: False if any was missed, None if any was not measured."""
    mets = [t["met"] for t in targets]
    return False if False in mets else (None if None in mets or not mets else True)


def readme_row(comparison: str, result: str, target_text: str = "",
               targets: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """A line of the README's table (benchmarks/readme_table.py renders it), written by a section from
    its own figures. `targets`: the target dicts the line states, whose `met` it shows."""
    out: dict[str, Any] = {"comparison": comparison, "result": result, "target": target_text}
    if targets:
        out["met"], out["targets"] = all_met(targets), [t["name"] for t in targets]
    return out


def run_timed(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 900, cwd: Path = REPO
) -> tuple[float, subprocess.CompletedProcess]:
    """Wall time of a command from launch to exit (a fresh interpreter each time)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    return time.perf_counter() - t0, proc


def train_script(root: Path, overrides: list[str], timeout: float = 3600) -> float:
    """`python scripts/train.py paths.root=ROOT ...` as a user runs it; its wall time (it must succeed)."""
    cmd = [PYTHON, str(REPO / "scripts" / "train.py"), f"paths.root={root}", *overrides]
    seconds, proc = run_timed(cmd, env=bench_env(), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/train.py {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def bench_env(**extra: str) -> dict[str, str]:
    """The environment kbtune's entry points set for themselves, for the commands the benchmarks launch."""
    env = dict(os.environ)
    env.update(
        MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", PYTHONUNBUFFERED="1"
    )
    env.update(extra)
    return env


def other_load(sample_s: float = 1.0) -> dict[str, Any]:
    """What else is using the CPU right now: the load average and the busiest processes not ours.
    Timings taken beside other work are noisy; the report says so instead of hiding it."""
    import psutil

    ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in ours]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(sample_s)
    busy = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
        except psutil.Error:
            continue
        if cpu >= 5:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])
            busy.append({"pid": p.pid, "cpu_percent": round(cpu, 1), "cmd": cmd[:120]})
    busy.sort(key=lambda b: -b["cpu_percent"])
    total = sum(b["cpu_percent"] for b in busy)
    return {"loadavg": list(os.getloadavg()), "other_cpu_percent": round(total, 1), "busy": busy[:8],
            "quiet": total < 20}  # fmt: skip


# The CPU features that decide matmul speed (and so MFU and every throughput figure).
MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
_NOT_FAMILY = {"r", "tm", "cpu", "processor", "genuine", "authentic", "with", "radeon", "graphics"}


def machine_slug(cpu: str, cores: int | None, flags: list[str]) -> str:
    """A filename-safe name for the machine: vendor and family words of the CPU model, the core count,
    and `amx` where the CPU has AMX bf16 ("intel-xeon-2c-amx", "amd-epyc-2c")."""
    words = []
    for word in re.findall(r"[A-Za-z][A-Za-z0-9]*", cpu.split("@")[0]):
        if word.lower() in _NOT_FAMILY or any(c.isdigit() for c in word):
            continue
        words.append(word.lower())
    parts = [*(words[:2] or ["cpu"]), f"{cores or 0}c", *(["amx"] if "amx_bf16" in flags else [])]
    return re.sub(r"[^a-z0-9-]+", "", "-".join(parts))


def commit() -> str:
    """The commit the benchmarks ran from (+dirty when tracked files had changes): a result is of that code."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()

    head = git("rev-parse", "HEAD")
    return (
        f"{head}+dirty"
        if head and git("status", "--porcelain", "--untracked-files=no")
        else head or "unknown"
    )


def machine() -> dict[str, Any]:
    info = ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
    lines = info.splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    present = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    cpu, cores = (names[0] if names else platform.processor() or platform.machine()), os.cpu_count()
    flags = [f for f in MATMUL_FLAGS if f in present]
    return {
        "cpu": cpu, "cores": cores, "python": platform.python_version(),
        "avx512_bf16": "avx512_bf16" in present, "amx_bf16": "amx_bf16" in present,
        "flags": flags, "slug": machine_slug(cpu, cores, flags),
    }  # fmt: skip


# -- the table ------------------------------------------------------------------------------------
def num(value: float | None, unit: str = "") -> str:
    """A figure as the tables print it: 3 significant digits below 10, then 2 and 1 decimals, then
    thousands separators."""
    if value is None:
        return "-"
    if unit == "%":
        return f"{value:.1f}%"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.2f}"


def render(report: dict[str, Any]) -> str:
    rows = [r for section in report["sections"].values() for r in section.get("rows", [])]
    header = ["section", "comparison", "variant", "metric", "median", "min..max", "n", "ratio"]
    lines = [[r["section"], r["comparison"], r["variant"], f"{r['metric']} ({r['unit']})" if r["unit"] else r["metric"],
              num(r["median"], r["unit"]), f"{num(r['min'], r['unit'])}..{num(r['max'], r['unit'])}", str(r["n"]),
              f"{r['ratio']:.2f}x {r['baseline']}" if r["ratio"] is not None else ""] for r in rows]  # fmt: skip
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    targets = [t for section in report["sections"].values() for t in section.get("targets", [])]
    if targets:
        out += ["", "targets:"]
        for t in targets:
            mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            value = "-" if t["value"] is None else f"{t['value']:.3g}"
            base = f" (vs {t['baseline']})" if t["baseline"] else ""
            out.append(f"  [{mark:>12}] {t['name']}: {value} {t['op']} {t['threshold']:g}{base}")
    out.append("")
    for when in ("before", "after"):
        load = report["meta"].get(f"load_{when}")
        if load:
            out.append(f"load {when}: {load.get('loadavg')} other processes {load.get('other_cpu_percent')}% CPU"
                       f" ({'quiet' if load.get('quiet') else 'NOT quiet: timings are noisy'})")  # fmt: skip
    return "\n".join(out)


def section_main(run: Any, doc: str | None) -> None:
    """Run one section on its own: `python benchmarks/<section>.py [--quick] [--workdir DIR]`."""
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "kbtune-bench"))
    args = parser.parse_args()
    result = run(Path(args.workdir) / ("quick" if args.quick else "full"), args.quick)
    print(json.dumps({k: result[k] for k in ("rows", "targets", "details") if k in result}, indent=1))
