#!/usr/bin/env python3
"""Dump an op case file for `m3h verify` from PyTorch (or NumPy) tensors.

The layout is compare/cases/case.h's (schema_version 1): root attributes format = "m3h-case",
schema_version, op, precision ("fp32" | "bf16" | "fp64"), seed, generator and one attribute per
op parameter (integers int64, reals float64; `m3h case --list` names them); /inputs/<name> and
/outputs/<name> with float tensors as float32 / float64 / bf16 by precision (bf16 = uint16 bits
with attribute dtype = "bfloat16"), ids int32, positions int64. Tensors the GPU path keeps in fp32
even in bf16 mode (block scores, router logits and weights: kind "f32") stay float32 there.

The example dumps msa_attention: seeded inputs, an independent block-sparse attention in NumPy
standing in for "your kernel", its outputs; then `m3h verify OUT.h5` checks them against the
reference. Replace the kernel call with yours (torch tensors are accepted as they are, bf16
included) and keep the names and shapes that `m3h case --op msa_attention --list` shows.

    /usr/bin/python3 datasets/tools/dump_case.py /tmp/msa.h5 --precision bf16
    build/cpu/compare/m3h verify /tmp/msa.h5

Needs h5py and numpy; torch is used only when it is installed.
"""
import argparse
import sys

import h5py
import numpy as np

try:  # optional: only to accept torch tensors (and show how)
    import torch
except ImportError:
    torch = None

FORMAT = "m3h-case"
SCHEMA_VERSION = 1


def to_numpy(x):
    """A torch tensor (any device, bf16 included) or array-like -> NumPy array."""
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # bf16 widens exactly
    return np.asarray(x)


def bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (what torch's .to(torch.bfloat16) does)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    bits[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaN a (quiet) NaN
    return bits


def round_bf16(x):
    """Values rounded to bf16, as float32."""
    return (bf16_bits(x).astype(np.uint32) << 16).view(np.float32)


def storage(kind, precision):
    """kind: "act" (activations, weights), "f32" (kept fp32 on the bf16 path), "ids", "pos"."""
    if kind == "ids":
        return "int32"
    if kind == "pos":
        return "int64"
    if precision == "fp64":
        return "float64"
    return "bfloat16" if (kind == "act" and precision == "bf16") else "float32"


def write_case(path, op, precision, params, inputs, outputs, seed=0, generator=None):
    """inputs / outputs: {name: (tensor, kind)}. params: {name: int | float}."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["schema_version"] = np.int64(SCHEMA_VERSION)
        f.attrs["op"] = op
        f.attrs["precision"] = precision
        f.attrs["seed"] = np.int64(seed)
        f.attrs["generator"] = generator or " ".join(sys.argv)
        for name, value in params.items():
            f.attrs[name] = np.int64(value) if isinstance(value, (int, np.integer)) else np.float64(value)
        for group, tensors in (("inputs", inputs), ("outputs", outputs)):
            for name, (x, kind) in tensors.items():
                x = to_numpy(x)
                st = storage(kind, precision)
                if st == "bfloat16":
                    d = f.create_dataset(f"/{group}/{name}", data=bf16_bits(x))
                    d.attrs["dtype"] = "bfloat16"
                else:
                    f.create_dataset(f"/{group}/{name}", data=x.astype(st))


# --- the example: msa_attention ---------------------------------------------------------------

def make_inputs(p, rng):
    """q [T, Hq*D], k, v [N, Hkv*D], q_pos [T] (the last query at N-1), sel [Hkv*T, K_blk]."""
    T, N, Hq, Hkv, D, BLK, K = (p[k] for k in ("T", "N", "Hq", "Hkv", "D", "BLK", "K_blk"))
    q_pos = np.sort(np.concatenate([[N - 1, 0], rng.choice(np.arange(1, N - 1), T - 2, replace=False)]))
    sel = -np.ones((Hkv * T, K), dtype=np.int64)
    for r in range(Hkv * T):
        L = q_pos[r % T] // BLK  # the query's own block: always selected, last valid slot
        older = rng.permutation(L)[: min(K - 1, L)]
        sel[r, : len(older)] = older
        sel[r, len(older)] = L
    return {"q": rng.standard_normal((T, Hq * D)), "k": rng.standard_normal((N, Hkv * D)),
            "v": rng.standard_normal((N, Hkv * D)), "q_pos": q_pos, "sel": sel}


def msa_attention(q, k, v, q_pos, sel, p):
    """Stand-in for the kernel under test: block-sparse causal attention in fp64, plain loops."""
    T, Hq, Hkv, D, BLK = q.shape[0], p["Hq"], p["Hkv"], p["D"], p["BLK"]
    out = np.zeros((T, Hq * D))
    for t in range(T):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            keys = np.concatenate([np.arange(b * BLK, min((b + 1) * BLK, q_pos[t] + 1))
                                   for b in sorted(sel[g * T + t]) if b >= 0])
            z = k[keys, g * D:(g + 1) * D] @ q[t, h * D:(h + 1) * D] / np.sqrt(D)
            w = np.exp(z - z.max())
            out[t, h * D:(h + 1) * D] = (w / w.sum()) @ v[keys, g * D:(g + 1) * D]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="the case file to write")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp64"])
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    params = {"T": 7, "N": 150, "Hq": 8, "Hkv": 2, "D": 32, "BLK": 16, "K_blk": 4}
    x = make_inputs(params, np.random.default_rng(a.seed))
    # The kernel sees exactly what the file will hold: bf16-rounded (or fp32-rounded) inputs.
    for name in ("q", "k", "v"):
        x[name] = x[name] if a.precision == "fp64" else (
            round_bf16(x[name]) if a.precision == "bf16" else x[name].astype(np.float32)).astype(np.float64)
    out = msa_attention(x["q"], x["k"], x["v"], x["q_pos"], x["sel"], params)
    if torch is not None:  # what a PyTorch harness would hand over: torch tensors, bf16 where bf16
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[a.precision]
        x = {n: torch.from_numpy(np.asarray(t)).to(dt if n in ("q", "k", "v") else torch.int64) for n, t in x.items()}
        out = torch.from_numpy(out).to(dt)
    inputs = {"q": (x["q"], "act"), "k": (x["k"], "act"), "v": (x["v"], "act"),
              "q_pos": (x["q_pos"], "pos"), "sel": (x["sel"], "ids")}
    write_case(a.out, "msa_attention", a.precision, params, inputs, {"out": (out, "act")}, seed=a.seed)
    print(f"wrote {a.out}: op msa_attention, precision {a.precision}; check it with: m3h verify {a.out}")


if __name__ == "__main__":
    main()
