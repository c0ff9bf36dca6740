"""``make fuzz``: the fuzz campaign of tests/fuzz at length (``MARGIN_FUZZ_EXAMPLES`` cases per RPC, default 500),
with a table of the status codes each service answered. Exits 1 if any call answered INTERNAL or UNKNOWN or hung,
if a server or helper process restarted, or if the data created before the campaign changed.

    python -m tests.fuzz [--examples N] [--only Budgets.RecordSpend ...]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from grpc_health.v1 import health_pb2
from rich.console import Console
from rich.table import Table

from tests.fuzz.engine import Tally, campaign, examples_per_rpc, rpcs
from tests.fuzz.stack import fuzz_stack

CODES_FIRST = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED", "FAILED_PRECONDITION")


def histogram(tally: Tally) -> Table:
    codes = sorted({c for counts in tally.codes.values() for c in counts},
                   key=lambda c: (CODES_FIRST.index(c) if c in CODES_FIRST else len(CODES_FIRST), c))
    table = Table(title="Status codes per service")
    table.add_column("service")
    for code in codes:
        table.add_column(code, justify="right", style="red bold" if code in ("INTERNAL", "UNKNOWN") else None)
    table.add_column("calls", justify="right")
    for service in sorted(tally.codes):
        counts = tally.codes[service]
        table.add_row(service, *(str(counts.get(c, 0)) for c in codes), str(tally.total(service)))
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=examples_per_rpc(500), help="cases per RPC")
    parser.add_argument("--only", nargs="*", default=None, help="RPCs to fuzz, e.g. Budgets.RecordSpend")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the servers log each refused request; the table is the report
    console = Console(width=160)
    selected = [r for r in rpcs() if not args.only or str(r) in args.only]
    total, problems, started = Tally(), [], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="margin-fuzz-") as home, fuzz_stack(Path(home)) as stack:
        caller = stack.caller()
        before, processes = stack.snapshot(), stack.processes()
        console.print(f"fuzzing {len(selected)} RPCs x {args.examples} cases (tenant key, admin key, no key)")
        for part, tally in campaign(caller, stack.messages(), args.examples, selected):
            for service, counts in tally.codes.items():
                total.codes[service].update(counts)
            total.failures += tally.failures
            codes = sum(tally.codes.values(), Counter())
            shown = ", ".join(f"{code} {n}" for code, n in codes.most_common())
            console.print(f"  {part}: {tally.total()} calls ({shown}), {len(tally.failures)} failing",
                          highlight=False)
        caller.close()
        if stack.processes() != processes:
            problems.append(f"a helper process restarted: {processes} -> {stack.processes()}")
        deadline = time.monotonic() + 60
        while set(stack.health().values()) != {health_pb2.HealthCheckResponse.SERVING}:
            if time.monotonic() > deadline:
                problems.append(f"not every service is SERVING: {stack.health()}")
                break
            time.sleep(0.5)
        if stack.snapshot() != before:
            problems.append("the data created before the campaign changed")
    console.print(histogram(total))
    console.print(f"{total.total()} calls in {time.monotonic() - started:.0f} s; "
                  f"{len(total.failures)} INTERNAL/UNKNOWN or hung", highlight=False)
    for line in [*total.failures[:50], *problems]:
        console.print(line, style="red", highlight=False, markup=False)
    return 1 if total.failures or problems else 0


if __name__ == "__main__":
    sys.exit(main())
