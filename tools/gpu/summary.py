"""The summary of tools/gpu/check.sh: one table and one JSON line from what its parts left in OUT, and the JSON in
OUT/summary.json.

    python3 tools/gpu/summary.py OUT

Reads OUT/check.json (the check's settings), OUT/<part>.status.json (status, exit code, seconds, limit), and each
part's figures: pytest's junit XML, the bench's JSON line (or, for a bench stopped by its limit, the partial JSON it
wrote after each measurement), the learning run's logs in OUT/runs and OUT/learning.tgz. Only the standard library:
it runs wherever check.sh does.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

PARTS = ("pytest", "bench", "bench_compiled", "group", "learning")

# What the GPU figures are measured against (docs/performance.md).
UPDATE_TARGET_MS = 2.5  # pixel sac_ae update, median
AGENT_STEP_TARGET_MS = 5.5  # cheetah_run, one seed
GROUP_TARGET = 1000.0  # agent steps/s, ten seeds in one process
LEARNING_TARGET = 238.0  # cartpole_swingup sac_ae, mean eval return of 10 seeds at 100k env steps
LEARNING_ENV_STEPS = 100_000


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_json_line(path: Path):
    """The last line of a file that parses as a JSON object (what sacae bench prints last)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def last_error_line(out: Path, name: str) -> str | None:
    """The last non-empty line of a part's stderr, for the table when it did not succeed."""
    try:
        lines = [line.strip() for line in (out / f"{name}.err").read_text(errors="replace").splitlines()]
    except OSError:
        return None
    lines = [line for line in lines if line and not line.startswith("check.sh: ") or "on purpose" in line]
    return lines[-1][:200] if lines else None


# ------------------------------------------------------------------------------------------------------------
# Figures of each part


def pytest_progress(out: Path) -> dict:
    """What pytest -v printed of each test's outcome (its junit XML is written only when the session ends: a run
    stopped by its limit leaves these lines alone)."""
    outcomes: dict[str, str] = {}
    try:
        text = (out / "pytest.out").read_text(errors="replace")
    except OSError:
        return {}
    for line in text.splitlines():
        m = re.match(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", line)
        if m:
            outcomes[m.group(1)] = m.group(2)
    if not outcomes:
        return {}
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
    return {
        "collected": len(outcomes),
        "passed": counts["PASSED"],
        "failed": counts["FAILED"],
        "errors": counts["ERROR"],
        "skipped": counts["SKIPPED"],
        "failed_tests": [k for k, v in outcomes.items() if v in ("FAILED", "ERROR")],
        "skip_reasons": [],
        "from": "pytest.out (the session did not end)",
    }


def pytest_figures(out: Path) -> dict:
    try:
        root = ET.parse(out / "pytest.xml").getroot()
    except (OSError, ET.ParseError):
        return pytest_progress(out)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname', '')}.{case.get('name', '')}"
        for s in suites
        for case in s.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    reasons = sorted(
        {
            (sk.get("message") or "")[:160]
            for s in suites
            for case in s.iter("testcase")
            for sk in case.findall("skipped")
        }
    )
    return {
        "collected": counts["tests"],
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failed_tests": failed,
        "skip_reasons": reasons,
    }


def bench_result(out: Path, name: str) -> tuple[dict | None, bool]:
    """The bench's JSON (complete), else its partial JSON; and whether it is partial."""
    result = last_json_line(out / f"{name}.out")
    if result is not None and "device" in result:
        return result, False
    partial = read_json(out / f"{name}.partial.json")
    return (partial, True) if isinstance(partial, dict) else (None, False)


def _ms(summary: dict) -> float:
    return round(summary["median_s"] * 1e3, 4)


def update_summaries(r: dict) -> dict[str, dict]:
    """The bench's update timings by 'configuration precision compile mode'."""
    rows = {}
    own = f"{r.get('precision', 'fp32')} compile {r.get('compile', 'auto')}"
    for configuration, s in r.get("update", {}).items():
        rows[f"{configuration} {own}"] = s
    for variant, table in r.get("update_variants", {}).items():
        for configuration, s in table.items():
            rows[f"{configuration} {variant}"] = s
    return rows


def update_rows(r: dict) -> dict[str, float]:
    """Median update milliseconds by 'configuration precision compile mode'."""
    return {k: _ms(s) for k, s in update_summaries(r).items()}


def bench_figures(out: Path, name: str) -> dict:
    r, partial = bench_result(out, name)
    if r is None:
        return {}
    f: dict = {"device_name": r.get("device_name"), "torch": r.get("torch"), "partial": partial}
    if r.get("update") or r.get("update_variants"):
        f["update_ms"] = update_rows(r)
        fell_back = [k for k, s in update_summaries(r).items() if "compile on" in k and s.get("compiled") is False]
        if fell_back:
            f["compile_fell_back"] = fell_back
    if r.get("update_reference"):
        f["update_reference_ms"] = {f"{c} {r.get('precision')}": _ms(s) for c, s in r["update_reference"].items()}
    if "env" in r:
        env = r["env"]
        f["env_action_repeat"] = env.get("action_repeat")
        for part in ("step", "physics", "render"):
            if part in env:
                f[f"env_{part}_ms"] = _ms(env[part])
    for key in ("train", "train_overlap"):
        if key in r:
            t = r[key]
            f[f"{key}_task"] = t.get("task", r.get("train_task"))
            f[f"{key}_agent_steps_per_s"] = round(t["agent_steps_per_s"], 3)
            f[f"{key}_ms_per_agent_step"] = round(1e3 / t["agent_steps_per_s"], 4)
    if r.get("group"):
        f["group_agent_steps_per_s"] = {n: round(g["agent_steps_per_s"], 3) for n, g in r["group"].items()}
        f["group_env_steps_per_s"] = {n: round(g["env_steps_per_s"], 3) for n, g in r["group"].items()}
        peaks = {n: g["gpu_peak_memory_gb"] for n, g in r["group"].items() if "gpu_peak_memory_gb" in g}
        if peaks:
            f["group_gpu_peak_memory_gb"] = peaks
    if "tf32" in r:
        f["tf32"] = r["tf32"]
    for key in ("gpu_peak_memory_gb", "peak_rss_gb"):
        if key in r:
            f[key] = round(r[key], 3)
    if partial:  # the peaks inside the measurements taken
        peaks = [s.get("gpu_peak_memory_gb") for s in r.get("update", {}).values()]
        peaks = [p for p in peaks if p is not None]
        if peaks:
            f["gpu_peak_memory_gb"] = round(max(peaks), 3)
    # A compiled update that fell back to eager says so in one line on stderr.
    try:
        notes = [
            line.strip()[:200]
            for line in (out / f"{name}.err").read_text(errors="replace").splitlines()
            if "compil" in line.lower() and not line.startswith("check.sh: ")
        ]
    except OSError:
        notes = []
    if notes:
        f["compile_notes"] = notes[:5]
    return f


def read_log(path: Path) -> list[dict]:
    rows = []
    try:
        for line in path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    except OSError:
        pass
    return rows


def learning_figures(out: Path) -> dict:
    runs = out / "runs"
    seed_dirs = sorted({p.parent for p in runs.rglob("config.json")}) if runs.is_dir() else []
    if not seed_dirs:
        return {}
    evals = {d.name: read_log(d / "eval.log") for d in seed_dirs}
    trains = {d.name: read_log(d / "train.log") for d in seed_dirs}
    states = {d.name: (read_json(d / "status.json") or {}).get("state") for d in seed_dirs}
    # Env steps each seed reached: its status.json (written at every episode and when it stops), else its logs.
    reached = {}
    for d in seed_dirs:
        status = read_json(d / "status.json") or {}
        logged = [r.get("env_steps", 0) for r in evals[d.name] + trains[d.name]]
        reached[d.name] = int(status.get("env_steps") or max(logged or [0]))
    by_step: dict[int, list[float]] = {}
    for rows in evals.values():
        for row in rows:
            if "env_steps" in row and "episode_reward" in row:
                by_step.setdefault(int(row["env_steps"]), []).append(float(row["episode_reward"]))
    n = len(seed_dirs)
    eval_mean = {str(k): round(statistics.fmean(v), 2) for k, v in sorted(by_step.items()) if len(v) == n}
    f: dict = {
        "seeds": n,
        "seeds_with_eval": sum(1 for rows in evals.values() if rows),
        "env_steps_min": min(reached.values()),
        "env_steps_max": max(reached.values()),
        "finished_seeds": sum(1 for s in states.values() if s == "finished"),
        "states": sorted(set(map(str, states.values()))),
        "eval_mean_by_env_steps": eval_mean,
    }
    if eval_mean:
        last = max(eval_mean, key=int)
        f["last_eval_env_steps"] = int(last)
        f["last_eval_mean"] = eval_mean[last]
    status = read_json(out / "learning.status.json") or {}
    f["stopped_by_sigterm"] = status.get("rc") == 143  # at the budget: checkpointed, to be resumed
    archive = out / "learning.tgz"
    if archive.is_file():
        try:
            with tarfile.open(archive) as tar:
                names = tar.getnames()
            f["archive"] = archive.name
            f["archive_files"] = len(names)
            f["archive_eval_logs"] = sum(1 for name in names if name.endswith("/eval.log"))
        except (OSError, tarfile.TarError) as e:
            f["archive_error"] = str(e)
    return f


def figures(out: Path, name: str) -> dict:
    if name == "pytest":
        return pytest_figures(out)
    if name == "learning":
        return learning_figures(out)
    return bench_figures(out, name)


# ------------------------------------------------------------------------------------------------------------
# The table


def key_figures(name: str, f: dict) -> str:
    if not f:
        return ""
    if name == "pytest":
        text = f"{f['passed']} passed, {f['failed']} failed, {f['errors']} errors, {f['skipped']} skipped"
        if f["skipped"] and f["skip_reasons"]:
            text += f" ({f['skip_reasons'][0][:70]})"
        return text
    if name == "learning":
        text = f"{f['seeds']} seeds, {f['env_steps_min']:,}-{f['env_steps_max']:,} env steps"
        text += f", {f['finished_seeds']} finished"
        if f.get("stopped_by_sigterm"):
            text += " (stopped at the budget)"
        if "last_eval_mean" in f:
            text += f", mean eval return {f['last_eval_mean']:.1f} at {f['last_eval_env_steps']:,}"
        return text
    parts = []
    rows = f.get("update_ms", {})
    if rows:
        parts.append("update " + ", ".join(f"{k} {v:.3g} ms" for k, v in rows.items() if k.startswith("sac_ae")))
    if "update_reference_ms" in f:
        parts.append("authors' style " + ", ".join(f"{v:.3g} ms" for v in f["update_reference_ms"].values()))
    if "env_step_ms" in f:
        split = ", ".join(f"{p} {f[f'env_{p}_ms']:.3g}" for p in ("physics", "render") if f"env_{p}_ms" in f)
        parts.append(f"env step {f['env_step_ms']:.3g} ms ({split})")
    if "train_ms_per_agent_step" in f:
        text = f"{f['train_task']} {f['train_ms_per_agent_step']:.3g} ms/agent step"
        if "train_overlap_ms_per_agent_step" in f:
            text += f" (overlap {f['train_overlap_ms_per_agent_step']:.3g})"
        parts.append(text)
    if "group_agent_steps_per_s" in f:
        parts.append(
            "agent steps/s " + ", ".join(f"{n} seeds {v:,.1f}" for n, v in f["group_agent_steps_per_s"].items())
        )
    if "gpu_peak_memory_gb" in f:
        parts.append(f"GPU peak {f['gpu_peak_memory_gb']:.2f} GB")
    if f.get("compile_fell_back"):
        parts.append("compile fell back to eager: " + ", ".join(f["compile_fell_back"]))
    if f.get("partial"):
        parts.append("(partial)")
    return "; ".join(parts)


def targets(parts: dict) -> list[dict]:
    """Each target with the measured figure (the best of the variants measured) and whether it is met."""
    updates = {}
    for name in ("bench", "bench_compiled"):
        updates.update(parts.get(name, {}).get("figures", {}).get("update_ms", {}))
    fp32 = {k: v for k, v in updates.items() if k.startswith("sac_ae fp32")}
    bench = parts.get("bench", {}).get("figures", {})
    steps = {
        k: bench[f"{k}_ms_per_agent_step"] for k in ("train", "train_overlap") if f"{k}_ms_per_agent_step" in bench
    }
    group = parts.get("group", {}).get("figures", {}).get("group_agent_steps_per_s", {})
    learning = parts.get("learning", {}).get("figures", {})
    out = []

    def add(target, measured, how, met):
        out.append({"target": target, "measured": measured, "how": how, "met": met})

    if fp32:
        best = min(fp32, key=fp32.get)
        add(f"pixel sac_ae update median <= {UPDATE_TARGET_MS} ms", fp32[best], best, fp32[best] <= UPDATE_TARGET_MS)
    else:
        add(f"pixel sac_ae update median <= {UPDATE_TARGET_MS} ms", None, "not measured", None)
    if steps and bench.get("train_task") == "cheetah_run":
        best = min(steps, key=steps.get)
        how = "overlap on" if best == "train_overlap" else "overlap off"
        add(f"cheetah_run one seed <= {AGENT_STEP_TARGET_MS} ms per agent step", steps[best], how,
            steps[best] <= AGENT_STEP_TARGET_MS)  # fmt: skip
    else:
        add(f"cheetah_run one seed <= {AGENT_STEP_TARGET_MS} ms per agent step", None, "not measured", None)
    if "10" in group:
        add(f"ten seeds in one process >= {GROUP_TARGET:,.0f} agent steps/s", group["10"], "10 seeds",
            group["10"] >= GROUP_TARGET)  # fmt: skip
    else:
        add(f"ten seeds in one process >= {GROUP_TARGET:,.0f} agent steps/s", None, "not measured", None)
    key = str(LEARNING_ENV_STEPS)
    means = learning.get("eval_mean_by_env_steps", {})
    name = f"cartpole_swingup sac_ae at 100k env steps, mean of 10 seeds >= {LEARNING_TARGET:.0f}"
    if key in means and learning.get("seeds") == 10:
        add(name, means[key], "10 seeds", means[key] >= LEARNING_TARGET)
    elif "last_eval_mean" in learning:
        how = f"not reached: {learning['seeds']} seeds, last common evaluation at {learning['last_eval_env_steps']:,}"
        add(name, learning["last_eval_mean"], how, None)
    else:
        add(name, None, "not measured", None)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    check = read_json(out / "check.json") or {}
    parts = {}
    for name in PARTS:
        status = read_json(out / f"{name}.status.json") or {"status": "missing"}
        entry = {k: status.get(k) for k in ("status", "rc", "seconds", "limit_s")}
        entry["figures"] = figures(out, name)
        if entry["status"] != "ok":
            entry["error"] = last_error_line(out, name)
        parts[name] = entry
    summary = {"check": check, "parts": parts, "targets": targets(parts)}
    if check.get("tiny") or check.get("device") == "cpu":
        summary["note"] = "tiny sizes or a CPU: these figures prove the plumbing only; they do not measure the targets"

    lines = [
        f"GPU check: device {check.get('device')}, budget {check.get('budget_s')} s"
        + (", tiny sizes (plumbing only)" if check.get("tiny") else ""),
        f"{'part':<16}{'status':<9}{'seconds':>9}{'limit':>7}  key figures",
    ]
    for name, e in parts.items():
        seconds = "" if e["seconds"] is None else f"{e['seconds']:.1f}"
        limit = "" if e["limit_s"] is None else str(e["limit_s"])
        text = key_figures(name, e["figures"])
        if e["status"] != "ok" and e.get("error"):
            text = (text + "; " if text else "") + e["error"]
        lines.append(f"{name:<16}{e['status']:<9}{seconds:>9}{limit:>7}  {text}")
    lines.append("targets:")
    for t in summary["targets"]:
        verdict = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        measured = "-" if t["measured"] is None else f"{t['measured']:,.4g}"
        lines.append(f"  {t['target']:<66} {measured:>10}  {verdict:<8} ({t['how']})")
    text = json.dumps(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
