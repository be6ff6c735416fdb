#!/usr/bin/env python3
"""The hottest SASS lines of each kernel in `ncu --page source --print-source sass --csv` output.

Usage: ncu_hot.py SOURCE_CSV [--top N]

ncu prints one table per profiled kernel: a header row naming the columns (the instruction's
address and text, then metrics such as "Warp Stall Sampling (All Samples)" and "Instructions
Executed"), then a row per SASS instruction. This prints, for each table, the N instructions with
the most stall samples (the share of the kernel's samples, the executed count and the text), so
that a session with no Nsight Compute can read where a kernel waits. Column names are matched by
substring, since they vary a little between ncu versions; a table whose columns cannot be found is
reported with its header, never skipped silently. Exit status 1 when no table was understood.
"""
import argparse
import csv
import sys


def find(header, *needles):
    """Index of the first column whose name contains every needle (case-insensitive), or None."""
    for i, name in enumerate(header):
        low = name.lower()
        if all(n.lower() in low for n in needles):
            return i
    return None


def number(s):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return 0.0


def tables(rows):
    """Yields (title, header, body): a header is a row with a 'Source' column and a stall column."""
    title, header, body = "", None, []
    for row in rows:
        if not row:
            continue
        is_header = find(row, "source") is not None and find(row, "stall") is not None
        if is_header:
            if header is not None:
                yield title, header, body
            header, body = row, []
        elif header is not None and len(row) == len(header):
            body.append(row)
        else:  # a line outside a table (a kernel's name, a note): the next table's title
            if header is not None:
                yield title, header, body
                header, body = None, []
            title = " ".join(c for c in row if c).strip()
    if header is not None:
        yield title, header, body


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.reader(f))
    understood = 0
    for title, header, body in tables(rows):
        src = find(header, "source")
        stall = find(header, "stall sampling", "all") or find(header, "stall")
        execd = find(header, "instructions executed") or find(header, "executed")
        addr = find(header, "address")
        print(f"== {title or '(kernel)'}: {len(body)} instructions")
        if src is None or stall is None:
            print("   columns not recognized; header:", header)
            continue
        understood += 1
        total = sum(number(r[stall]) for r in body) or 1.0
        print(f"   stall samples {total:.0f}; top {args.top} instructions by samples")
        print(f"   {'share':>6} {'samples':>8} {'executed':>10}  {'address':>8}  instruction")
        for r in sorted(body, key=lambda r: -number(r[stall]))[: args.top]:
            ex = r[execd] if execd is not None else "-"
            ad = r[addr] if addr is not None else "-"
            print(f"   {100 * number(r[stall]) / total:5.1f}% {number(r[stall]):8.0f} {ex:>10}  {ad:>8}  {r[src].strip()}")
        print()
    if understood == 0:
        print("no table with a source and a stall column was found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
