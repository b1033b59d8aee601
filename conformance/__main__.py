"""``python -m conformance``: run the suite, print the summary table, write reports."""

from __future__ import annotations

import argparse
import sys
import time

from conformance import golden, runner
from conformance.adapters import ALIASES, BACKENDS, resolve_backends
from conformance.cases import all_cases, select


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Run the fp8core conformance suite on numpy (reference) and on every path of "
                    "torch and JAX.")
    aliases = "; ".join(f"{a} = {'+'.join(v)}" for a, v in ALIASES.items())
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma-separated backend paths to run (default: {','.join(BACKENDS)}; "
                        f"{aliases}); numpy, the reference, always runs")
    p.add_argument("--filter", default=None, metavar="PATTERN",
                   help="run only cases whose id contains PATTERN, or matches it as a glob (* ?)")
    p.add_argument("--quick", action="store_true", help="the quick subset (< 30 s; what the tests run)")
    p.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    p.add_argument("--list", action="store_true", help="list the selected case ids and exit")
    p.add_argument("--report-dir", default=".", help="where to write conformance-report.{json,md} (default: .)")
    p.add_argument("--regenerate-golden", action="store_true",
                   help="rewrite conformance/golden/*.npz from the reference, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    try:  # the reference is always the first column
        names = resolve_backends(n.strip() for n in args.backends.split(",") if n.strip())
    except ValueError as err:
        p.error(f"--backends: {err}")

    if args.regenerate_golden:
        for path in golden.regenerate():
            print(f"wrote {path}")
        return 0

    cases = select(all_cases(args.seed, args.quick), args.filter)
    if args.list:
        for c in cases:
            print(c.id)
        print(f"{len(cases)} cases", file=sys.stderr)
        return 0

    start = time.perf_counter()
    results = runner.run(cases, names, progress=not args.no_progress)
    results += golden.check(pattern=args.filter)
    elapsed = time.perf_counter() - start
    for name in names:
        reason = BACKENDS[name].unavailable()
        if reason:
            print(f"{name}: skipped ({reason})")
    print(runner.format_table(results))
    failed = [r for r in results if r.status == "failed"]
    for r in failed[:20]:
        print(f"FAILED {r.case_id} ({r.pair}): {r.message}")
    if len(failed) > 20:
        print(f"... and {len(failed) - 20} more failures (see the report)")
    meta = {"backends": ", ".join(names), "cases": len(cases), "quick": args.quick, "seed": args.seed,
            "filter": args.filter or "", "seconds": round(elapsed, 1), **runner.environment()}
    js, md = runner.write_reports(results, args.report_dir, meta)
    n_pass = sum(r.status == "passed" for r in results)
    n_skip = sum(r.status == "skipped" for r in results)
    print(f"conformance: {n_pass} passed, {len(failed)} failed, {n_skip} skipped "
          f"in {elapsed:.1f} s; reports: {js}, {md}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
