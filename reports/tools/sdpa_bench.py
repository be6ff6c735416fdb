#!/usr/bin/env python3
"""PyTorch SDPA baseline for the dense causal GQA prefill kernel (bench_gpu BM_attention_prefill).

Times torch.nn.functional.scaled_dot_product_attention(is_causal=True) on the shapes of
compare/bench/bench_gpu_prefill.cpp: one sequence, M3's heads (Hq 64, Hkv 4, D 128), bf16,
T = N in {8192, 16384, 32768, 131072}. Two ways of giving it GQA, each printed:
  enable_gqa  K, V with Hkv heads and enable_gqa=True (PyTorch >= 2.5): what a GQA model calls;
  expanded    K, V repeated to Hq heads (repeat_interleave) before the call, outside the timing:
              every backend accepts it, so the fastest one is eligible (cuDNN among them).
Each line also names the backend: "default" is PyTorch's own choice; --backends adds one line per
explicit backend (flash, efficient, cudnn) where PyTorch accepts the shape.
Tensors are contiguous [B, H, L, D] (SDPA's preferred layout; our kernel reads [L, H*D] rows).
Timing: CUDA events around each call, after warm-up; the median of --reps calls (bounded to
about --budget-s seconds per line). FLOPs: FlashAttention's causal convention 2 * Hq * D * N^2
(half of 4 * Hq * D * N^2), the same as BM_attention_prefill's TFLOP/s counter.

Output: one JSON object per line,
  {"shape": {"B":1,"Hq":64,"Hkv":4,"D":128,"T":N,"N":N,"causal":true}, "variant": "enable_gqa",
   "backend": "default", "ms": median, "tflops": ..., "reps": n, "device": ..., "torch": ...}
and a line {"error": ...} for a shape/variant/backend that PyTorch refuses or that runs out of memory.
With --out PATH (alias --json-out) the JSON lines go to PATH and stdout gets one readable line per
measurement; without it they go to stdout, as before. Exit 3 when torch or a CUDA device is missing.
Usage: python3 reports/tools/sdpa_bench.py [--ctx 8192 16384 ...] [--backends] [--reps 20] [--out F]
"""
import argparse
import json
import statistics
import sys
import warnings

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:  # the GPU suite skips this step with a note (scripts/gpu-suite)
    print(f"sdpa_bench: PyTorch is not importable ({e}); nothing measured", file=sys.stderr)
    sys.exit(3)

HQ, HKV, D = 64, 4, 128


def causal_flops(n: int) -> float:
    return 2.0 * HQ * D * n * n


def time_calls(fn, reps: int, budget_s: float) -> tuple[float, int]:
    """Median milliseconds of fn() over up to `reps` event-timed calls after warm-up."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
        if sum(times) > budget_s * 1e3 and len(times) >= 3:
            break
    return statistics.median(times), len(times)


def readable(rec: dict) -> str:
    """One measurement as a table row: context, variant, backend, time and throughput (or the error)."""
    head = f"SDPA N={rec['shape']['N']:>6} {rec['variant']:<10} {rec['backend']:<9}"
    if "error" in rec:
        return f"{head} error: {rec['error']}"
    return f"{head} {rec['ms']:9.3f} ms {rec['tflops']:7.1f} TFLOP/s ({rec['reps']} reps, {rec['device']}, torch {rec['torch']})"


def backend_context(name: str):
    if name == "default":
        import contextlib
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
         "cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    return sdpa_kernel([b])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[8192, 16384, 32768, 131072])
    ap.add_argument("--backends", action="store_true", help="also time each SDPA backend explicitly")
    ap.add_argument("--variants", nargs="+", default=["enable_gqa", "expanded"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=3.0, help="stop repeating a line after this long")
    ap.add_argument("--out", "--json-out", dest="out", default=None,
                    help="write the JSON lines to this file (stdout then gets readable lines)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("sdpa_bench: torch sees no CUDA device; nothing measured", file=sys.stderr)
        sys.exit(3)
    sink = open(args.out, "w") if args.out else None
    # PyTorch explains every backend it skips with a UserWarning; the JSON "error" field says it.
    warnings.filterwarnings("ignore", category=UserWarning)
    dev = torch.cuda.get_device_name()
    backends = ["default"] + (["flash", "efficient", "cudnn"] if args.backends else [])
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in args.ctx:
        shape = {"B": 1, "Hq": HQ, "Hkv": HKV, "D": D, "T": n, "N": n, "causal": True}
        q = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
        for variant in args.variants:
            if variant == "expanded":
                kk, vv, gqa = k.repeat_interleave(HQ // HKV, dim=1), v.repeat_interleave(HQ // HKV, dim=1), False
            else:
                kk, vv, gqa = k, v, True
            for b in backends:
                rec = {"shape": shape, "variant": variant, "backend": b}
                try:
                    with backend_context(b):
                        fn = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                        ms, reps = time_calls(fn, args.reps, args.budget_s)
                    rec.update(ms=ms, tflops=causal_flops(n) / (ms * 1e-3) * 1e-12, reps=reps, device=dev,
                               torch=torch.__version__)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                    rec["error"] = str(e).splitlines()[0][:200]
                if sink:
                    sink.write(json.dumps(rec) + "\n")
                    sink.flush()
                    print(readable(rec), flush=True)
                else:
                    print(json.dumps(rec), flush=True)
            del kk, vv
            torch.cuda.empty_cache()
        del q, k, v
        torch.cuda.empty_cache()
    if sink:
        sink.close()


if __name__ == "__main__":
    main()
