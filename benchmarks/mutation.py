"""Mutation score of the code we cannot run here (TensorRT) and of the code every verdict rests on.

For each group, a clean copy of the committed tree (``git archive HEAD``) gets a ``[mutmut]`` section
naming the modules to mutate and the tests that guard them; ``mutmut run`` then plants every mutant
(one operator, constant, keyword or call changed) and runs the tests that reach it. A mutant is
*killed* when a test fails (or times out), *survives* when every test passes, and has *no tests* when
none reaches it (counted as surviving). The score per module is killed / (killed + survived + no tests).

mutmut maps tests to mutants by the calls it sees in the test process. Code that tests reach only in a
child process (the TensorRT layer runs against NVIDIA's real bindings in a driver subprocess) looks
untested to it. Every mutant mutmut found no test for is therefore run once more the way mutmut runs
any mutant (``MUTANT_UNDER_TEST=<mutant>``, which the child inherits) against the group's tests that
start such a child: a failure kills it.

Results go to ``benchmarks/results/mutation.json`` with the command that reproduces them and every
surviving mutant's name (``mutmut show <name>`` in the kept work folder prints its diff).

    pip install mutmut            # the `mutation` extra; mutmut >= 3.8
    python benchmarks/mutation.py [group ...] [--jobs 2] [--keep DIR]

Slow (minutes to hours per group on 2 cores): not part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "mutation.json"
TARGET = 0.85

# group -> (modules to mutate, tests that guard them, the tests among them that reach code in a child process)
GROUPS = {
    "tensorrt": (["mmopt/trt/*.py", "mmopt/runners/tensorrt.py"], ["tests/trt"],
                 ["tests/trt/test_api_conformance.py", "tests/trt/test_trt_protocol.py"]),
    "store": (["mmopt/store.py"], ["tests/test_store_unit.py", "tests/reliability/test_faults.py"],
              ["tests/reliability/test_faults.py"]),
    "gates": (["mmopt_runtime/compare.py", "mmopt/judge/compare.py", "mmopt/bench/gates.py"],
              ["tests/judge/test_compare_exact.py", "tests/judge/test_compare_edges.py", "tests/bench/test_gates_unit.py"],
              []),
    "precision-stages": (["mmopt/stages/int8.py", "mmopt/stages/fp16.py", "mmopt/stages/ranges.py"],
                         ["tests/precision/test_stages_unit.py"], []),
}
# tests deselected per group, beyond those that read the source text and those that need a GPU
DESELECT = {"store": "exports"}
KILLED = {1, 3, 24, -24, 36, 152, 255, 37}  # test failure, pytest internal error, timeouts, type check
SURVIVED = {0}
NO_TESTS = {5, 33}


def mutmut() -> str:
    exe = shutil.which("mutmut") or str(Path(sys.executable).with_name("mutmut"))
    if not Path(exe).exists():
        raise SystemExit("mutmut is not installed: pip install mutmut (mutmut >= 3.8)")
    return exe


def markers(group: str) -> str:
    # tests that read or mutate the source text cannot run on mutmut's rewritten copy
    return " and ".join(["not source_text", "not gpu", *(f"not {m}" for m in DESELECT.get(group, "").split())])


def setup_cfg(modules: list[str], tests: list[str], group: str) -> str:
    lines = ["[mutmut]", "source_paths=", "    mmopt", "    mmopt_runtime", "only_mutate=", *(f"    {m}" for m in modules),
             "pytest_add_cli_args_test_selection=", *(f"    {t}" for t in tests),
             "pytest_add_cli_args=", "    -m", f"    {markers(group)}",
             "also_copy=", "    benchmarks", "    docs", "    README.md", "    pyproject.toml"]
    return "\n".join(lines) + "\n"


def rerun_untested(mutants: Path, keys: list[str], tests: list[str], jobs: int, marks: str) -> dict[str, int]:
    """Exit codes of the group's tests with each mutant in ``keys`` active (see the module text)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(key: str) -> int:
        env = {**os.environ, "MUTANT_UNDER_TEST": key, "PY_IGNORE_IMPORTMISMATCH": "1"}
        try:
            return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m",
                                   marks, *tests], cwd=mutants, env=env,
                                  capture_output=True, timeout=600).returncode
        except subprocess.TimeoutExpired:
            return 36
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(zip(keys, pool.map(one, keys)))


def run_group(name: str, work: Path, jobs: int, only: list[str] | None = None) -> dict:
    modules, tests, child_tests = GROUPS[name]
    modules = only or modules
    tests = [t for t in tests if (ROOT / t).exists()]
    work.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    (work / "setup.cfg").write_text(setup_cfg(modules, tests, name))
    cmd = [mutmut(), "run", "--max-children", str(jobs)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    metas = sorted((work / "mutants").rglob("*.py.meta"))
    codes_of = {m: json.loads(m.read_text()).get("exit_code_by_key", {}) for m in metas}
    untested = [k for codes in codes_of.values() for k, c in codes.items() if c in NO_TESTS]
    print(f"  mutmut: {sum(map(len, codes_of.values()))} mutants; {len(untested)} reached by no test in the test "
          f"process: running each against {', '.join(child_tests) or 'nothing (no child-process tests)'}", flush=True)
    rerun = rerun_untested(work / "mutants", untested, child_tests, jobs, markers(name)) if child_tests else {}
    seconds = time.perf_counter() - t0
    per_module = {}
    for meta in metas:
        rel = str(meta.relative_to(work / "mutants"))[: -len(".meta")]
        codes = {k: rerun.get(k, c) for k, c in codes_of[meta].items()}
        if not codes:
            continue
        killed = [k for k, c in codes.items() if c in KILLED]
        survived = [k for k, c in codes.items() if c in SURVIVED]
        untested = [k for k, c in codes.items() if c in NO_TESTS]
        other = {k: c for k, c in codes.items() if k not in {*killed, *survived, *untested}}
        judged = len(killed) + len(survived) + len(untested)
        per_module[rel] = {"mutants": len(codes), "killed": len(killed), "survived": len(survived),
                           "no_tests": len(untested), "other": other,
                           "score": round(len(killed) / judged, 4) if judged else None,
                           "meets_target": bool(judged) and len(killed) / judged >= TARGET,
                           "surviving": sorted(survived + untested)}
    if not any(row["killed"] + row["survived"] + row["no_tests"] for row in per_module.values()):
        raise SystemExit(f"{name}: mutmut judged no mutant (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return {"modules": modules, "tests": tests, "child_process_tests": child_tests, "seconds": round(seconds, 1),
            "mutmut_exit": r.returncode,
            "mutmut_tail": (r.stdout + r.stderr)[-1500:] if r.returncode else "", "per_module": per_module}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="*", default=list(GROUPS), help=f"groups to run: {', '.join(GROUPS)}")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--keep", type=Path, help="keep the work folders here (for `mutmut show`)")
    ap.add_argument("--modules", nargs="+", metavar="PATH",
                    help="re-measure only these modules of the (one) group; the group's other rows are kept")
    args = ap.parse_args()
    if args.modules and len(args.groups) != 1:
        raise SystemExit("--modules needs exactly one group")
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}; groups: {', '.join(GROUPS)}")
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results.setdefault("groups", {})
    base = args.keep or Path(tempfile.mkdtemp(prefix="mmopt-mutation-"))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    for g in args.groups:
        work = base / g
        if work.exists():
            shutil.rmtree(work)
        print(f"{g}: mutating {', '.join(args.modules or GROUPS[g][0])} ...", flush=True)
        res = run_group(g, work, args.jobs, args.modules)
        for row in res["per_module"].values():
            row["commit"] = commit
        if args.modules and g in results["groups"]:  # keep the rows not re-measured, each with its own commit
            old = results["groups"][g]
            for row in old["per_module"].values():
                row.setdefault("commit", old.get("commit"))
            res = {**res, "modules": old["modules"], "per_module": {**old["per_module"], **res["per_module"]},
                   "seconds": res["seconds"]}
        res["commit"] = commit
        res["command"] = f"python benchmarks/mutation.py {g}" + (f" --modules {' '.join(args.modules)}"
                                                                  if args.modules else "")
        results["groups"][g] = res
        for mod, row in res["per_module"].items():
            print(f"  {mod:<40} {row['killed']:>4}/{row['killed'] + row['survived'] + row['no_tests']:<4} killed "
                  f"score {row['score']}  {'ok' if row['meets_target'] else 'BELOW ' + str(TARGET)}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["target"] = TARGET
    results["command"] = "pip install mutmut && python benchmarks/mutation.py  # every group; each group's own below"
    results["tool"] = subprocess.run([mutmut(), "--version"], capture_output=True, text=True).stdout.strip()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
