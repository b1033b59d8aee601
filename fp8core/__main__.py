"""``python -m fp8core [--json]``: print :func:`fp8core.info` (versions, the C kernel,
environment switches, the active path per framework and why)."""

import argparse
import json
import sys

from fp8core._info import format_info, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8core", description=(
        "What fp8core will run here: versions, the C kernel, FP8CORE_* switches, and which "
        "path torch and JAX take for CPU tensors (and why)."))
    parser.add_argument("--json", action="store_true", help="print fp8core.info() as JSON")
    args = parser.parse_args(argv)
    d = info()
    print(json.dumps(d, indent=1, default=str) if args.json else format_info(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
