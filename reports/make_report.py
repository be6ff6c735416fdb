#!/usr/bin/env python3
"""Turns `m3h study` JSON (and optionally `m3h cost --sweep --format json`) into REPORT.md + figures.

    m3h study --preset m3-layer --part gpu --out gpu.json            # on the GPU host
    m3h study --preset m3-layer --part cpu,quality --out cpu.json    # anywhere
    m3h cost --preset m3 --sweep --format json > cost.json
    python3 reports/make_report.py gpu.json cpu.json --cost cost.json --out-dir reports

The inputs are merged (each file may hold any of the parts cpu_decode, quality, gpu). The report
states where every number comes from (card, driver where given, date, commit, command) and never
invents one: a part missing from the inputs is reported as missing. Figures need matplotlib; without
it the report keeps its tables and says the figures were skipped.

Reference points: the MSA paper's 28.4x attention-FLOP ratio per token at 1M (causal average),
14.2x prefill and 7.6x decode wall-clock (H800); DESIGN 10's stretch targets 18x prefill, 10x
decode, 14x decode with the fp8 index-K cache.
"""
import argparse
import json
import math
import os
import sys

PAPER = {"flops_1m": 28.4, "prefill_1m": 14.2, "decode_1m": 7.6}
STRETCH = {"prefill_1m": 18.0, "decode_1m": 10.0, "decode_fp8_1m": 14.0}
ONE_M = 1 << 20


def die(msg):
    print(f"make_report: error: {msg}", file=sys.stderr)
    sys.exit(2)


def load(paths):
    merged = {"sources": []}
    for p in paths:
        try:
            with open(p) as f:
                j = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            die(f"{p}: {e}")
        if not isinstance(j, dict) or not any(k in j for k in ("cpu_decode", "quality", "gpu")):
            die(f"{p}: not `m3h study` JSON (expected one of the keys cpu_decode, quality, gpu)")
        merged["sources"].append({"file": os.path.basename(p), "has_gpu": "gpu" in j, **{k: j.get(k) for k in
                                  ("command", "build_commit", "date_utc", "cpu", "config", "seed")}})
        for k in ("cpu_decode", "quality"):
            if k in j:
                merged.setdefault(k, []).extend(j[k])
        if "gpu" in j:
            if "gpu" in merged:
                die(f"{p}: a second gpu part (give one GPU run per report)")
            merged["gpu"] = j["gpu"]
    return merged


def ctx(n):
    return f"{n // ONE_M}M" if n >= ONE_M and n % ONE_M == 0 else (f"{n // 1024}K" if n % 1024 == 0 else str(n))


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def at(rows, n, **match):
    for r in rows:
        if r["context"] == n and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def verdict(value, target):
    return "met" if value >= target else f"short by {target / value:.2f}x"


class Figures:
    def __init__(self, out_dir, enabled):
        self.dir = os.path.join(out_dir, "figures")
        self.plt = None
        self.note = ""
        if not enabled:
            self.note = "figures skipped (--no-figures)"
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            self.plt = plt
            os.makedirs(self.dir, exist_ok=True)
        except ImportError:
            self.note = "figures skipped: matplotlib is not importable by this python3 (Debian: python3-matplotlib)"

    def context_axes(self, ax, ylabel, title):
        """A context sweep's axes: log2 x in tokens, a grid, the legend."""
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)

    def breakdown(self, pts, unit, title, name, parts=None):
        """MSA's parts stacked per context against dense (keys *_us or *_ms). parts: (label, r -> value)
        pairs; default the index / select / sparse times."""
        fig, ax = self.plt.subplots(figsize=(6.5, 4))
        xs = range(len(pts))
        bottom = [0.0] * len(pts)
        if parts is None:
            parts = [(label, lambda r, k=f"{part}_{unit}": r[k])
                     for part, label in (("index", "index"), ("select", "select"), ("sparse", "sparse attention"))]
        for label, value in parts:
            vals = [value(r) for r in pts]
            ax.bar(xs, vals, bottom=bottom, label=f"MSA {label}")
            bottom = [a + v for a, v in zip(bottom, vals)]
        ax.plot(xs, [r[f"dense_{unit}"] for r in pts], "k^-", label="dense")
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([ctx(r["context"]) for r in pts])
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=8)
        return self.save(fig, name)

    def save(self, fig, name):
        path = os.path.join(self.dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        self.plt.close(fig)
        return f"![{name}](figures/{name})"


def decode_section(g, figs):
    dec = g.get("decode") or []
    if not dec:
        return "## Decode\n\nNo GPU decode points in the inputs.\n"
    copy = g["peaks"]["copy_gbps"]
    rows = []
    for r in dec:
        rows.append([r["batch"], ctx(r["context"]), f"{r['dense_us']:.1f}", f"{r['msa_us']:.1f}",
                     f"{r['dense_us'] / r['msa_us']:.2f}x", f"{r['msa_fp8_us']:.1f}",
                     f"{r['dense_us'] / r['msa_fp8_us']:.2f}x",
                     f"{100 * r['dense_bytes'] / (r['dense_us'] * 1e3) / copy:.0f}%",
                     f"{100 * r['msa_bytes'] / (r['msa_us'] * 1e3) / copy:.0f}%",
                     f"{100 * r['dense_us'] / (r['dense_us'] + r['rest_us']):.0f}% / "
                     f"{100 * r['msa_us'] / (r['msa_us'] + r['rest_us']):.0f}%"])
    md = ["## Decode: one token per sequence at context n, one layer",
          "",
          "Time is the median of CUDA-event timings with L2 flushed; `% copy` is the necessary bytes over "
          f"the time, as a fraction of the measured device copy ({copy:.0f} GB/s). The layer share is "
          "attention's part of the layer time (dense / MSA), the rest (norms, projections, router, "
          "experts) measured for the same batch. The copy counts read + write bytes; a read-only stream (both "
          "decodes) can pass 100% of it (study runs before 2026-11-29's second one measured the copy on "
          "128 MiB, ~12% low, and showed dense decode at 108-110%).",
          "",
          table(["b", "n", "dense us", "MSA us", "speedup", "MSA fp8 us", "speedup fp8", "dense % copy",
                 "MSA % copy", "attention share of layer"], rows), ""]
    lines = []
    for b in sorted({r["batch"] for r in dec}):
        r = at(dec, ONE_M, batch=b)
        if r:
            s, s8 = r["dense_us"] / r["msa_us"], r["dense_us"] / r["msa_fp8_us"]
            lines.append(f"- b = {b} at 1M: {s:.2f}x with a bf16 index-K cache (paper {PAPER['decode_1m']}x: "
                         f"{verdict(s, PAPER['decode_1m'])}; stretch {STRETCH['decode_1m']}x: "
                         f"{verdict(s, STRETCH['decode_1m'])}), {s8:.2f}x with fp8 (paper {PAPER['decode_1m']}x: "
                         f"{verdict(s8, PAPER['decode_1m'])}; stretch "
                         f"{STRETCH['decode_fp8_1m']}x: {verdict(s8, STRETCH['decode_fp8_1m'])}).")
            # Which kernel holds MSA back, against the step's bandwidth roofline (GB/s * 1e3 = bytes/us).
            roof = r["msa_bytes"] / (copy * 1e3)
            idx_roof = b * r["context"] * 128 * 2 / (copy * 1e3)  # the index-K read alone (Di 128, bf16)
            # Studies from 2026-11-29 (sixth H200 session) on also time a plain read of the index-K bytes (stream_read): the
            # scan's own roofline, which the 1 GiB copy overstates at one sequence.
            read = (f"; a plain read of those bytes, measured: {r['read_us']:.1f} us, so the scan takes "
                    f"{r['index_us'] / r['read_us']:.2f}x the read it needs; a bf16 index-K scan as fast as that read, with free "
                    f"selection and attention, would take this step to {r['dense_us'] / r['read_us']:.2f}x"
                    if r.get("read_us") else "")
            # The step is the index scan then msa_select_attention (one fused kernel at decode-sized batches
            # from 2026-11-30 on), so what follows the scan is msa_us - index_us; select_us and sparse_us are
            # each kernel timed alone.
            after = r["msa_us"] - r["index_us"]
            lines.append(f"  Of the MSA step's {r['msa_us']:.1f} us (its necessary bytes at the copy bandwidth: "
                         f"{roof:.1f} us), index scoring takes {r['index_us']:.1f} us (its index-K read at the "
                         f"copy bandwidth: {idx_roof:.1f} us{read}); the selection and the sparse attention add "
                         f"{after:.1f} us after it (timed alone: selection {r['select_us']:.1f} us, sparse attention "
                         f"{r['sparse_us']:.1f} us), which hardly grows with n: latency that no bandwidth hides, "
                         f"{100 * after / r['msa_us']:.0f}% of the step.")
            if r.get("read_fp8_us") and r.get("index_fp8_us"):
                lines.append(f"  With the fp8 cache the step takes {r['msa_fp8_us']:.1f} us: index scoring "
                             f"{r['index_fp8_us']:.1f} us against a plain read of its bytes, measured: "
                             f"{r['read_fp8_us']:.1f} us ({r['index_fp8_us'] / r['read_fp8_us']:.2f}x the read it needs).")
    md += lines + [""]
    if figs.plt:
        plt = figs.plt
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for b in sorted({r["batch"] for r in dec}):
            pts = sorted((r for r in dec if r["batch"] == b), key=lambda r: r["context"])
            x = [r["context"] for r in pts]
            ax.plot(x, [r["dense_us"] / r["msa_us"] for r in pts], "o-", label=f"b={b}, bf16 index-K")
            ax.plot(x, [r["dense_us"] / r["msa_fp8_us"] for r in pts], "s--", label=f"b={b}, fp8 index-K")
        ax.scatter([ONE_M], [PAPER["decode_1m"]], marker="*", s=150, c="k", zorder=5, label="paper (H800)")
        figs.context_axes(ax, "dense time / MSA time", "Decode speedup, one layer")
        md.append(figs.save(fig, "decode_speedup.png"))
        pts = sorted((r for r in dec if r["batch"] == min(r["batch"] for r in dec)), key=lambda r: r["context"])
        md.append(figs.breakdown(pts, "us", f"Decode time breakdown, b = {pts[0]['batch']}", "decode_breakdown.png",
                                 parts=[("index", lambda r: r["index_us"]),
                                        ("selection + sparse attention (after the scan)",
                                         lambda r: max(r["msa_us"] - r["index_us"], 0.0))]))
    return "\n".join(md) + "\n"


def sparse_kernel(r):
    # Runs before 2026-11-29's fourth did not record msa_attention_prefill's tile kernel.
    return r.get("sparse_kernel", "unrecorded")


def prefill_section(g, figs):
    pre = g.get("prefill") or []
    if not pre:
        return "## Prefill\n\nNo GPU prefill points in the inputs.\n"
    peak = g["peaks"]["gemm_tflops"]
    rows = []
    for r in pre:
        msa_fl = r["index_flops"] + r["sparse_flops"]
        rows.append([ctx(r["context"]), r["dense_kernel"], r.get("index_kernel", "mma_sync"), sparse_kernel(r),
                     f"{r['dense_ms']:.2f}",
                     f"{r['index_ms']:.2f}",
                     f"{r['select_ms']:.2f}", f"{r['sparse_ms']:.2f}", f"{r['msa_ms']:.2f}",
                     f"{r['dense_ms'] / r['msa_ms']:.2f}x",
                     f"{100 * r['dense_flops'] / (r['dense_ms'] * 1e9) / peak:.0f}%",
                     f"{100 * msa_fl / (r['msa_ms'] * 1e9) / peak:.0f}%",
                     f"{r['chunks_timed']}/{r['chunks']}"])
    md = ["## Prefill: one sequence of n tokens, one layer",
          "",
          f"Chunks of queries; `timed` < `chunks` means an even sample of chunks was timed and the rest "
          f"extrapolated. `% peak` is achieved TFLOP/s over the measured bf16 GEMM peak ({peak:.0f} TFLOP/s).",
          "",
          table(["n", "dense kernel", "index kernel", "sparse kernel", "dense ms", "index ms", "select ms", "sparse ms", "MSA ms", "speedup",
                 "dense % peak", "MSA % peak", "timed"], rows), ""]
    r = at(pre, ONE_M)
    if r:
        s = r["dense_ms"] / r["msa_ms"]
        md.append(f"- At 1M: {s:.2f}x (paper {PAPER['prefill_1m']}x: {verdict(s, PAPER['prefill_1m'])}; stretch "
                  f"{STRETCH['prefill_1m']}x: {verdict(s, STRETCH['prefill_1m'])}). MSA's time splits into index "
                  f"{100 * r['index_ms'] / r['msa_ms']:.0f}%, selection {100 * r['select_ms'] / r['msa_ms']:.0f}%, "
                  f"sparse attention {100 * r['sparse_ms'] / r['msa_ms']:.0f}%; the sparse kernel runs at "
                  f"{r['sparse_flops'] / (r['sparse_ms'] * 1e9):.0f} TFLOP/s against the dense kernel's "
                  f"{r['dense_flops'] / (r['dense_ms'] * 1e9):.0f}.")
        # Which kernel holds MSA back, against the rate the dense kernel reaches on the same card.
        dense_tf = r["dense_flops"] / (r["dense_ms"] * 1e9)
        idx_tf, sp_tf = r["index_flops"] / (r["index_ms"] * 1e9), r["sparse_flops"] / (r["sparse_ms"] * 1e9)
        idx_at, sp_at = r["index_flops"] / (dense_tf * 1e9), r["sparse_flops"] / (dense_tf * 1e9)
        best = idx_at + r["select_ms"] + sp_at
        md.append(f"- Against that rate ({dense_tf:.0f} TFLOP/s, {100 * dense_tf / peak:.0f}% of the GEMM peak): the "
                  f"index scoring ({r.get('index_kernel', 'mma_sync')}) runs at {idx_tf:.0f} TFLOP/s and takes "
                  f"{r['index_ms']:.0f} ms where {idx_at:.0f} ms would do ({r['index_ms'] / idx_at:.1f}x over); the "
                  f"sparse attention (msa_attention_prefill, {sparse_kernel(r)} tiles, KV-block-outer with fp32 "
                  f"partials per query, head and slot) runs at {sp_tf:.0f} TFLOP/s and takes {r['sparse_ms']:.0f} ms where {sp_at:.0f} ms would "
                  f"do ({r['sparse_ms'] / sp_at:.1f}x over). With both at the dense kernel's rate and selection as "
                  f"measured, MSA would take {best:.0f} ms: {r['dense_ms'] / best:.1f}x.")
        md.append("")
    if figs.plt:
        plt = figs.plt
        pts = sorted(pre, key=lambda r: r["context"])
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.plot([r["context"] for r in pts], [r["dense_ms"] / r["msa_ms"] for r in pts], "o-", label="measured")
        ax.scatter([ONE_M], [PAPER["prefill_1m"]], marker="*", s=150, c="k", zorder=5, label="paper (H800)")
        figs.context_axes(ax, "dense time / MSA time", "Prefill speedup, one layer")
        md.append(figs.save(fig, "prefill_speedup.png"))
        md.append(figs.breakdown(pts, "ms", "Prefill time breakdown, one layer", "prefill_breakdown.png"))
    return "\n".join(md) + "\n"


def peak_section(g, figs):
    """Achieved vs peak: decode as a fraction of the copy bandwidth, prefill of the GEMM rate."""
    dec, pre = g.get("decode") or [], g.get("prefill") or []
    if not figs.plt or not (dec or pre):
        return ""
    plt = figs.plt
    copy, peak = g["peaks"]["copy_gbps"], g["peaks"]["gemm_tflops"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for b in sorted({r["batch"] for r in dec}):
        pts = sorted((r for r in dec if r["batch"] == b), key=lambda r: r["context"])
        x = [r["context"] for r in pts]
        dense_style = "k^-" if b == min(r["batch"] for r in dec) else "kv:"
        a1.plot(x, [100 * r["dense_bytes"] / (r["dense_us"] * 1e3) / copy for r in pts], dense_style, label=f"dense b={b}")
        a1.plot(x, [100 * r["msa_bytes"] / (r["msa_us"] * 1e3) / copy for r in pts], "o-", label=f"MSA b={b}")
        a1.plot(x, [100 * r["msa_fp8_bytes"] / (r["msa_fp8_us"] * 1e3) / copy for r in pts], "s--",
                label=f"MSA fp8 b={b}")
    figs.context_axes(a1, f"% of copy bandwidth ({copy:.0f} GB/s)", "Decode: bytes / time")
    a1.set_yscale("linear")
    pts = sorted(pre, key=lambda r: r["context"])
    x = [r["context"] for r in pts]
    a2.plot(x, [100 * r["dense_flops"] / (r["dense_ms"] * 1e9) / peak for r in pts], "k^-", label="dense")
    a2.plot(x, [100 * r["index_flops"] / (r["index_ms"] * 1e9) / peak for r in pts], "o-", label="MSA index")
    a2.plot(x, [100 * r["sparse_flops"] / (r["sparse_ms"] * 1e9) / peak for r in pts], "s-", label="MSA sparse")
    figs.context_axes(a2, f"% of bf16 GEMM peak ({peak:.0f} TFLOP/s)", "Prefill: FLOPs / time")
    a2.set_yscale("linear")
    return "## Achieved vs peak\n\n" + figs.save(fig, "achieved_vs_peak.png") + "\n"


def ratios_section(merged, cost, figs):
    md = ["## FLOP ratio: analytic, counted, and measured time", ""]
    cpu = sorted(merged.get("cpu_decode") or [], key=lambda r: r["context"])
    if cpu:
        exact = all(r["counts_match_analytic"] for r in cpu)
        md.append(f"The reference counted every multiply-add of one decode token (dense vs MSA) on {len(cpu)} "
                  f"contexts: counted and analytic ratios {'agree exactly on every one' if exact else 'DIFFER'}.")
        md.append("")
        md.append(table(["n", "FLOP ratio (analytic)", "FLOP ratio (counted)", "CPU time ratio"],
                        [[ctx(r["context"]), f"{r['flops_ratio_analytic']:.2f}x", f"{r['flops_ratio_counted']:.2f}x",
                          f"{r['time_ratio']:.2f}x"] for r in cpu]))
        md.append("")
    else:
        md.append("No CPU decode part in the inputs (`m3h study --part cpu`).\n")
    g = merged.get("gpu") or {}
    dec = g.get("decode") or []
    if dec:
        md.append("On the GPU decode is bandwidth-bound: what MSA saves is bytes, not FLOPs. Per key, dense reads K "
                  "and V of every KV head (2 x Hkv x D = 1024 bf16 values for M3), MSA reads one index key "
                  "(Di = 128): 1/8 of the bytes in bf16 and 1/16 in fp8, so the time ratio is bounded near 8x "
                  "(16x) while the FLOP ratio approaches 30x.")
        md.append("")
    if cost:
        rows = [r for r in cost.get("rows", []) if r["context"] >= 4096]
        if rows:
            md.append("Whole model, analytic (`m3h cost`; the 3 dense-attention layers stay dense):")
            md.append("")
            md.append(table(["n", "per-layer decode ratio", "whole-model decode ratio", "causal-average ratio",
                             "whole-model decode bytes ratio"],
                            [[ctx(r["context"]), f"{r['decode_ratio']:.2f}x", f"{r['model_decode_ratio']:.2f}x",
                              f"{r['causal_avg_ratio']:.2f}x", f"{r['model_decode_bytes_ratio']:.2f}x"]
                             for r in rows]))
            md.append("")
    if figs.plt and (cpu or dec):
        plt = figs.plt
        fig, ax = plt.subplots(figsize=(6.5, 4))
        if cpu:
            ax.plot([r["context"] for r in cpu], [r["flops_ratio_analytic"] for r in cpu], "k-", label="FLOPs, analytic")
            ax.plot([r["context"] for r in cpu], [r["flops_ratio_counted"] for r in cpu], "kx", label="FLOPs, counted")
            ax.plot([r["context"] for r in cpu], [r["time_ratio"] for r in cpu], "o-", label="time, CPU reference")
        for b in sorted({r["batch"] for r in dec}):
            pts = sorted((r for r in dec if r["batch"] == b), key=lambda r: r["context"])
            ax.plot([r["context"] for r in pts], [r["dense_us"] / r["msa_us"] for r in pts], "s-",
                    label=f"time, GPU b={b}")
        ax.scatter([ONE_M], [PAPER["flops_1m"]], marker="*", s=150, c="k", zorder=5, label="paper FLOP ratio")
        figs.context_axes(ax, "dense / MSA", "Decode: FLOP ratio vs time ratio")
        md.append(figs.save(fig, "ratios.png"))
    return "\n".join(md) + "\n"


def quality_section(merged, figs):
    q = merged.get("quality") or []
    if not q:
        return "## Selection quality\n\nNo quality part in the inputs (`m3h study --part quality`).\n"
    md = ["## Selection quality: attention mass on the selected blocks",
          "",
          "Recall = the dense attention probability mass that falls in the blocks MSA selected (mean, 10th "
          "percentile and minimum over queries and heads); `out rel-L2` = MSA output vs dense output, on one "
          "attention layer at op level. `random`: independent normal q, k, v and index q, k, as with untrained "
          "weights: the index branch knows nothing of the main branch, so recall is what the forced local block "
          "and chance give; it shows the machinery runs, not how good MSA is. `retrieval` and `decay` plant the "
          "same structure in both branches (a few needle blocks far back; a smooth recency decay): they show "
          "what selection can achieve when the index agrees with attention, and say nothing about whether a "
          "trained indexer does (the paper reports over 90% of the mass for M3's).",
          "",
          table(["pattern", "n", "recall mean", "p10", "min", "local-block mass", "out rel-L2"],
                [[r["pattern"], ctx(r["context"]), f"{r['recall_mean']:.4f}", f"{r['recall_p10']:.4f}",
                  f"{r['recall_min']:.4f}", f"{r['local_mass_mean']:.4f}", f"{r['out_rel_l2']:.3e}"] for r in q]),
          ""]
    if figs.plt:
        plt = figs.plt
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for p in sorted({r["pattern"] for r in q}):
            pts = sorted((r for r in q if r["pattern"] == p), key=lambda r: r["context"])
            ax.plot([r["context"] for r in pts], [r["recall_mean"] for r in pts], "o-", label=p)
        ax.axhline(0.9, color="k", ls=":", label="paper: > 0.9 (trained)")
        ax.set_ylim(0, 1.02)
        figs.context_axes(ax, "attention mass recalled", "Selection recall")
        md.append(figs.save(fig, "recall.png"))
    return "\n".join(md) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="`m3h study` JSON files (parts cpu_decode, quality, gpu)")
    ap.add_argument("--cost", help="`m3h cost --preset m3 --sweep --format json` output (whole-model view)")
    ap.add_argument("--out-dir", default="reports", help="where REPORT.md and figures/ go (default: reports)")
    ap.add_argument("--driver", default="", help="GPU driver version to print (the study JSON does not record it)")
    ap.add_argument("--commit", default="",
                    help="commit of the tree the GPU study ran, when the binary's stamp is not it (a device that "
                         "runs a copy of the working tree stamps its own checkout); the CPU inputs keep theirs")
    ap.add_argument("--no-figures", action="store_true", help="tables only")
    a = ap.parse_args()
    merged = load(a.inputs)
    cost = None
    if a.cost:
        try:
            with open(a.cost) as f:
                cost = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            die(f"{a.cost}: {e}")
        if "rows" not in cost:
            die(f"{a.cost}: not `m3h cost --sweep --format json` output (no rows)")
    os.makedirs(a.out_dir, exist_ok=True)
    figs = Figures(a.out_dir, not a.no_figures)
    g = merged.get("gpu")
    head = ["# MSA vs dense GQA: the cost study", ""]
    if g:
        head.append(f"GPU: {g['device']}" + (f", driver {a.driver}" if a.driver else "") +
                    f"; measured peaks in the same run: bf16 GEMM {g['peaks']['gemm_tflops']:.1f} TFLOP/s, device "
                    f"copy {g['peaks']['copy_gbps']:.0f} GB/s.")
    else:
        head.append("GPU: none in the inputs: this report has the CPU parts only.")
    head.append("")
    head.append("Inputs:")
    for s in merged["sources"]:
        commit = (a.commit if a.commit and s.get("has_gpu") else "") or s.get("build_commit") or "unknown"
        head.append(f"- `{s['file']}`: `{s.get('command')}` on {s.get('date_utc') or 'an unrecorded date'} "
                    f"(commit {commit}; host {s.get('cpu')})")
    if cost:
        head.append(f"- cost model: `{cost.get('command')}`")
    if figs.note:
        head += ["", f"Note: {figs.note}."]
    body = [decode_section(g, figs) if g else "## Decode\n\nNo GPU part in the inputs.\n",
            prefill_section(g, figs) if g else "## Prefill\n\nNo GPU part in the inputs.\n",
            peak_section(g, figs) if g else "",
            ratios_section(merged, cost, figs),
            quality_section(merged, figs)]
    with open(os.path.join(a.out_dir, "REPORT.md"), "w") as f:
        f.write("\n".join(head) + "\n\n" + "\n".join(body))
    print(f"wrote {os.path.join(a.out_dir, 'REPORT.md')}" + (f" and {figs.dir}/" if figs.plt else ""))


if __name__ == "__main__":
    main()
