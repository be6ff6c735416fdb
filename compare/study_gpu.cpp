// GPU cost study (study_gpu.h). One set of buffers sized for the largest point serves every point:
// caches in the batched layout of the attention kernels (sequence b owns rows [b*n, b*n + n)),
// random bf16 / E4M3 values tiled from a host pattern (timing does not depend on the values, except
// the router's choices, which random weights spread evenly over the experts).
#include "compare/study_gpu.h"

#include "gpu/kernels/attention_dense.h"
#include "gpu/kernels/attention_prefill.h"
#include "gpu/kernels/linear.h"
#include "gpu/kernels/moe_experts.h"
#include "gpu/kernels/moe_router.h"
#include "gpu/kernels/msa_attention.h"
#include "gpu/kernels/msa_attention_prefill.h"
#include "gpu/kernels/msa_index.h"
#include "gpu/kernels/msa_select.h"
#include "gpu/kernels/qk_norm_rope.h"
#include "gpu/kernels/rms_norm.h"
#include "gpu/kernels/sm90_attention_prefill.h"
#include "gpu/kernels/sm90_msa_index.h"
#include "gpu/runtime/buffer.h"
#include "gpu/runtime/device.h"
#include "gpu/runtime/stream_read.h"
#include "reference/cost.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

namespace m3::study {

namespace {

using gpu::bf16;
using gpu::DeviceBuffer;

constexpr std::size_t kPatternElems = std::size_t{1} << 25;  // 64 MiB of bf16: larger than L2

// Fills a buffer with a random pattern (uniform [-scale, scale)), uploaded once and tiled on the device.
template <class T>
void fill(DeviceBuffer<T>& d, std::uint64_t seed, float scale) {
  if (d.size() == 0) return;
  const std::size_t n = std::min(d.size(), kPatternElems);
  std::vector<float> f(n);
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& x : f) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    x = scale * static_cast<float>(static_cast<double>(s >> 11) * 0x1p-52 * 2.0 - 1.0);
  }
  if constexpr (std::is_same_v<T, float>) {
    M3_CUDA_CHECK(cudaMemcpy(d.data(), f.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  } else if constexpr (std::is_same_v<T, bf16>) {
    const auto b = gpu::to_bf16(f.data(), n);
    M3_CUDA_CHECK(cudaMemcpy(d.data(), b.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  } else {
    std::vector<T> e(n);
    for (std::size_t i = 0; i < n; ++i) e[i] = T(f[i]);
    M3_CUDA_CHECK(cudaMemcpy(d.data(), e.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  for (std::size_t done = n; done < d.size();) {
    const std::size_t m = std::min(done, d.size() - done);
    M3_CUDA_CHECK(cudaMemcpy(d.data() + done, d.data(), m * sizeof(T), cudaMemcpyDeviceToDevice));
    done += m;
  }
}

struct Timer {
  gpu::Stream stream;
  gpu::Event e0, e1;
  DeviceBuffer<unsigned char> flush;
  Timer() : flush(std::max<std::size_t>(2 * gpu::device_info().l2_bytes, 1 << 20)) {}
  using Fn = std::function<void(cudaStream_t)>;
  // For each (out, f) of jobs, *out = the median microseconds of f over reps rounds, the functions
  // taken in turn within a round; with flush, L2 is evicted before each run (decode reads every
  // layer's caches from HBM). Taken in turn, a drift of the card's state during a decode point
  // (clocks, power; one run measured dense decode 12% slower than another) moves all its
  // quantities alike, not the one measured in that stretch, and their ratios keep.
  void time_into(const std::vector<std::pair<double*, Fn>>& jobs, int reps, bool do_flush) {
    std::vector<std::vector<double>> t(jobs.size());
    for (int i = 0; i < reps; ++i)
      for (std::size_t k = 0; k < jobs.size(); ++k) {
        if (do_flush) M3_CUDA_CHECK(cudaMemsetAsync(flush.data(), 0, flush.bytes(), stream.get()));
        e0.record(stream.get());
        jobs[k].second(stream.get());
        e1.record(stream.get());
        t[k].push_back(1e3 * e1.since(e0));
      }
    for (std::size_t k = 0; k < jobs.size(); ++k) {
      std::sort(t[k].begin(), t[k].end());
      *jobs[k].first = t[k][t[k].size() / 2];
    }
  }
  // Median microseconds of f over reps runs (time_into with one job).
  double us(const Fn& f, int reps, bool do_flush) {
    double r = 0;
    time_into({{&r, f}}, reps, do_flush);
    return r;
  }
};

// Sum over all chunks of a per-chunk time measured at some chunk indices: exact when the time is
// linear in the chunk index (dense and index work grow linearly with the chunk's start; selection
// with its block count; sparse attention is nearly constant), by least squares on (index, time).
double extrapolate(const std::vector<int>& idx, const std::vector<double>& t, int chunks) {
  if (static_cast<int>(idx.size()) == chunks) {
    double s = 0;
    for (double x : t) s += x;
    return s;
  }
  double mx = 0, my = 0;
  for (std::size_t i = 0; i < idx.size(); ++i) mx += idx[i], my += t[i];
  mx /= idx.size(), my /= idx.size();
  double sxy = 0, sxx = 0;
  for (std::size_t i = 0; i < idx.size(); ++i) sxy += (idx[i] - mx) * (t[i] - my), sxx += (idx[i] - mx) * (idx[i] - mx);
  const double b = sxx > 0 ? sxy / sxx : 0, a = my - b * mx;
  return chunks * a + b * chunks * (chunks - 1) / 2.0;
}

}  // namespace

GpuStudy run_gpu_study(const ModelConfig& cfg, const GpuStudyOptions& o,
                       const std::function<void(const std::string&)>& progress) {
  auto say = [&](const std::string& s) {
    if (progress) progress(s);
  };
  if (gpu::device_count() == 0) throw std::runtime_error("gpu study: no CUDA device");
  cfg.validate();
  const AttnDims ad = cfg.attn_dims();
  const MsaDims md = cfg.msa_dims();
  const int H = cfg.hidden_size, Hq = ad.Hq, Hkv = ad.Hkv, D = ad.D, Hi = md.Hi, Di = md.Di, BLK = md.BLK, Kb = md.K_blk;
  const std::int64_t maxn = o.max_context;
  const int maxb = o.decode ? *std::max_element(o.batches.begin(), o.batches.end()) : 1;
  GpuStudy st;
  st.device = gpu::describe(gpu::device_info(0));
  Timer tm;
  cudaStream_t S = tm.stream.get();
  gpu::CublasHandle cublas;

  // Peaks.
  {
    DeviceBuffer<bf16> a(std::size_t{8192} * 8192), b(a.size()), c(a.size());
    fill(a, 1, 1.f);
    fill(b, 2, 1.f);
    const double us = tm.us([&](cudaStream_t s) { gpu::linear(cublas.get(), a.data(), b.data(), c.data(), 8192, 8192, 8192, s); }, 5, false);
    st.peaks.gemm_tflops = 2.0 * 8192.0 * 8192.0 * 8192.0 / (us * 1e-6) / 1e12;
    // 1 GiB each way, as bench_gpu's yardstick: the 128 MiB of the GEMM operands (used until
    // 2026-11-29) measured 3712-3820 GB/s against bench_gpu's 4209-4242 on the same H200, so every
    // `% copy` of those study runs reads ~12% high.
    const std::size_t bytes = std::size_t{1} << 30;
    DeviceBuffer<unsigned char> src(bytes), dst(bytes);
    M3_CUDA_CHECK(cudaMemsetAsync(src.data(), 1, bytes, S));
    const double cus = tm.us([&](cudaStream_t s) {
      M3_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, s));
    }, 5, false);
    st.peaks.copy_gbps = 2.0 * static_cast<double>(bytes) / (cus * 1e-6) / 1e9;
    say(fmt::format("peaks: bf16 GEMM {:.1f} TFLOP/s, copy {:.0f} GB/s", st.peaks.gemm_tflops, st.peaks.copy_gbps));
  }

  const std::size_t rows = static_cast<std::size_t>(maxb) * maxn;  // cache rows
  DeviceBuffer<bf16> k(rows * Hkv * D), v(rows * Hkv * D), ik(rows * Di);
  DeviceBuffer<__nv_fp8_e4m3> ik8(o.decode ? rows * Di : 0);
  DeviceBuffer<unsigned> fold(1);  // stream_read's XOR of the bytes it read: keeps the loads alive
  fill(k, 3, 2.f);
  fill(v, 4, 2.f);
  fill(ik, 5, 2.f);
  fill(ik8, 6, 2.f);
  const int qrows = std::max(o.prefill ? o.chunk : 0, maxb);
  DeviceBuffer<bf16> q(static_cast<std::size_t>(qrows) * Hq * D), iq(static_cast<std::size_t>(qrows) * Hi * Di),
      out(static_cast<std::size_t>(qrows) * Hq * D);
  fill(q, 7, 2.f);
  fill(iq, 8, 2.f);
  const std::int64_t nb_max = (maxn + BLK - 1) / BLK;
  DeviceBuffer<float> scores(static_cast<std::size_t>(qrows) * Hi * nb_max);
  DeviceBuffer<std::int32_t> sel(static_cast<std::size_t>(qrows) * Hi * Kb);
  DeviceBuffer<std::int64_t> pos(static_cast<std::size_t>(qrows));
  DeviceBuffer<unsigned char> ws;
  auto need_ws = [&](std::size_t b) {
    if (b > ws.size()) ws = DeviceBuffer<unsigned char>(b);
  };

  // The rest of the layer for T tokens: norms, fused projections, QK norms, o_proj, router, experts.
  auto rest_us = [&](int T) -> double {
    const int Wp = (Hq + 2 * Hkv) * D + (Hi + 1) * Di, E = cfg.num_local_experts, I = cfg.intermediate_size,
              Is = cfg.shared_intermediate_size, Ke = cfg.num_experts_per_tok;
    DeviceBuffer<bf16> h(static_cast<std::size_t>(T) * H), a(h.size()), o2(h.size()), norm_w(H), qn(D), in(Di);
    DeviceBuffer<bf16> wp(static_cast<std::size_t>(Wp) * H), wo(static_cast<std::size_t>(H) * Hq * D),
        proj(static_cast<std::size_t>(T) * Wp), attn(static_cast<std::size_t>(T) * Hq * D);
    DeviceBuffer<bf16> gu(static_cast<std::size_t>(E) * 2 * I * H), dn(static_cast<std::size_t>(E) * H * I),
        sgu(static_cast<std::size_t>(2) * Is * H), sdn(static_cast<std::size_t>(H) * Is);
    DeviceBuffer<float> rw(static_cast<std::size_t>(E) * H), rb(E), rl(static_cast<std::size_t>(T) * E),
        ew(static_cast<std::size_t>(T) * Ke);
    DeviceBuffer<std::int32_t> ex(static_cast<std::size_t>(T) * Ke);
    DeviceBuffer<std::int64_t> p(T);
    for (auto* b : {&h, &norm_w, &qn, &in, &wp, &wo, &attn, &gu, &dn, &sgu, &sdn}) fill(*b, 11, 0.05f);
    fill(rw, 12, 0.05f);
    fill(rb, 13, 0.01f);
    std::vector<std::int64_t> hp(T);
    for (int i = 0; i < T; ++i) hp[i] = i;
    p.upload(hp);
    gpu::MoeExpertWeights mw{gu.data(), dn.data(), E, I, Is > 0 ? sgu.data() : nullptr, Is > 0 ? sdn.data() : nullptr, Is};
    DeviceBuffer<unsigned char> mws(gpu::moe_experts_workspace_bytes(T, H, Ke, mw));
    const gpu::SwigluParams sp{};
    const double eps = cfg.rms_norm_eps;
    auto layer = [&](cudaStream_t s) {
      gpu::add_rms_norm(h.data(), o2.data(), norm_w.data(), eps, a.data(), T, H, s);
      gpu::linear(cublas.get(), a.data(), wp.data(), proj.data(), T, H, Wp, s);
      gpu::qk_norm_rope_to_cache(proj.data(), Wp, Hq, D, qn.data(), eps, cfg.rotary_dim, cfg.rope_theta, p.data(),
                                 attn.data(), static_cast<std::int64_t>(Hq) * D, T, nullptr, 0, nullptr, 0, s);
      gpu::qk_norm_rope_to_cache(proj.data() + Hq * D, Wp, Hkv, D, qn.data(), eps, cfg.rotary_dim, cfg.rope_theta,
                                 p.data(), proj.data() + Hq * D, Wp, T, nullptr, 0, nullptr, 0, s);
      gpu::qk_norm_rope_to_cache(proj.data() + (Hq + 2 * Hkv) * D, Wp, Hi + 1, Di, in.data(), eps, cfg.rotary_dim,
                                 cfg.rope_theta, p.data(), proj.data() + (Hq + 2 * Hkv) * D, Wp, T, nullptr, 0, nullptr, 0, s);
      gpu::linear(cublas.get(), attn.data(), wo.data(), o2.data(), T, Hq * D, H, s);
      gpu::add_rms_norm(h.data(), o2.data(), norm_w.data(), eps, a.data(), T, H, s);
      gpu::moe_router(a.data(), rw.data(), rb.data(), Ke, cfg.norm_topk_prob, rl.data(), ex.data(), ew.data(), T, H, E, s);
      gpu::moe_experts(cublas.get(), a.data(), ex.data(), ew.data(), T, H, Ke, mw, cfg.routed_scaling_factor, sp,
                       o2.data(), mws.data(), mws.size(), s);
    };
    layer(S);  // warm-up (cuBLAS heuristics, lazy module loads)
    return tm.us(layer, 5, true);
  };

  const auto ctxs = [&] {
    std::vector<std::int64_t> v;
    for (std::int64_t n = o.min_context; n <= maxn; n *= 2) v.push_back(n);
    return v;
  }();

  if (o.decode) {
    std::vector<double> rest(maxb + 1, 0.0);
    if (o.rest)
      for (int b : o.batches) rest[b] = rest_us(b);
    for (int b : o.batches)
      for (std::int64_t n : ctxs) {
        const int ni = static_cast<int>(n), nb = static_cast<int>((n + BLK - 1) / BLK);
        pos.upload(std::vector<std::int64_t>(b, n - 1));
        need_ws(std::max(gpu::attention_dense_workspace_bytes(1, ni, ad, b), gpu::msa_attention_workspace_bytes(1, Kb, ad, b)));
        auto index = [&](cudaStream_t s, bool fp8) {
          if (fp8) gpu::msa_index_fp8(iq.data(), ik8.data(), pos.data(), 1, ni, nb, md, scores.data(), s, b);
          else gpu::msa_index(iq.data(), ik.data(), pos.data(), 1, ni, nb, md, scores.data(), s, b);
        };
        auto select = [&](cudaStream_t s) { gpu::msa_select(scores.data(), pos.data(), 1, nb, md, sel.data(), s, b); };
        auto sparse = [&](cudaStream_t s) {
          gpu::msa_attention(q.data(), k.data(), v.data(), pos.data(), sel.data(), 1, ni, BLK, Kb, ad, out.data(), s,
                             ws.data(), ws.size(), b);
        };
        // The chain as the model runs it: the selection and sparse attention fused where they can be.
        auto select_sparse = [&](cudaStream_t s) {
          gpu::msa_select_attention(scores.data(), nb, md, q.data(), k.data(), v.data(), pos.data(), 1, ni, ad,
                                    sel.data(), out.data(), s, ws.data(), ws.size(), b);
        };
        GpuDecodePoint r;
        r.context = n;
        r.batch = b;
        // The scan's roofline: the same bytes read plainly (the fold word is reset outside the events).
        const std::size_t ik_bytes = static_cast<std::size_t>(b) * static_cast<std::size_t>(n) * Di * 2;
        M3_CUDA_CHECK(cudaMemsetAsync(fold.data(), 0, sizeof(unsigned), S));
        // One warm pass (the scores and selection the lone select and sparse runs read; lazy module
        // loads), then every quantity of the point in interleaved rounds (Timer::time_into).
        index(S, false);
        select(S);
        sparse(S);
        tm.time_into(
            {{&r.dense_us,
              [&](cudaStream_t s) {
                gpu::attention_dense(q.data(), k.data(), v.data(), pos.data(), 1, ni, ad, out.data(), s, ws.data(),
                                     ws.size(), b);
              }},
             {&r.index_fp8_us, [&](cudaStream_t s) { index(s, true); }},
             {&r.msa_fp8_us, [&](cudaStream_t s) { index(s, true); select_sparse(s); }},
             {&r.index_us, [&](cudaStream_t s) { index(s, false); }},  // leaves the bf16 scores for the two below
             {&r.select_us, select},
             {&r.sparse_us, sparse},
             {&r.msa_us, [&](cudaStream_t s) { index(s, false); select_sparse(s); }},
             {&r.read_us, [&](cudaStream_t s) { gpu::stream_read(ik.data(), ik_bytes, fold.data(), s, false); }},
             {&r.read_fp8_us,
              [&](cudaStream_t s) { gpu::stream_read(ik8.data(), ik_bytes / 2, fold.data(), s, false); }}},
            o.decode_reps, true);
        const AttnKeys keys = attn_keys_at(cfg, AttnType::MSA, n - 1);
        r.dense_bytes = b * static_cast<double>(n) * Hkv * D * 2 * 2;
        const double kv_sel = b * static_cast<double>(keys.attended) * Hkv * D * 2 * 2;
        r.msa_bytes = b * static_cast<double>(n) * Di * 2 + kv_sel;
        r.msa_fp8_bytes = b * static_cast<double>(n) * Di * 1 + kv_sel;
        r.dense_flops = b * 4.0 * Hq * D * static_cast<double>(n);
        r.msa_flops = b * (2.0 * Hi * Di * static_cast<double>(keys.scored) + 4.0 * Hq * D * static_cast<double>(keys.attended));
        r.rest_us = rest[b];
        say(fmt::format("decode b={} n={}: dense {:.1f} us, MSA {:.1f} us ({:.2f}x), fp8 {:.1f} us ({:.2f}x)", b, n, r.dense_us,
                        r.msa_us, r.dense_us / r.msa_us, r.msa_fp8_us, r.dense_us / r.msa_fp8_us));
        st.decode.push_back(r);
      }
  }

  if (o.prefill) {
    const bool sm90 = gpu::sm90_attention_prefill_available() && D == 128;
    const bool sm90_index = gpu::sm90_msa_index_available() && Di == 128 && BLK == 128;
    if (o.rest) st.rest_prefill_us_per_token = rest_us(4096) / 4096.0;
    for (std::int64_t n : ctxs) {
      const int C = static_cast<int>(std::min<std::int64_t>(o.chunk, n));
      const int chunks = static_cast<int>((n + C - 1) / C);
      std::vector<int> idx;
      const int m = std::min(chunks, o.max_timed_chunks);
      for (int i = 0; i < m; ++i) {
        const int c = m == 1 ? chunks - 1 : static_cast<int>(std::lround(static_cast<double>(i) * (chunks - 1) / (m - 1)));
        if (idx.empty() || idx.back() != c) idx.push_back(c);
      }
      std::vector<double> td, ti, ts, tp;
      for (int c : idx) {
        const std::int64_t p0 = static_cast<std::int64_t>(c) * C;
        const int Tc = static_cast<int>(std::min<std::int64_t>(C, n - p0));
        const int Nc = static_cast<int>(p0 + Tc), nb = (Nc + BLK - 1) / BLK;
        std::vector<std::int64_t> hp(Tc);
        for (int i = 0; i < Tc; ++i) hp[i] = p0 + i;
        pos.upload(hp);
        need_ws(std::max(gpu::msa_attention_prefill_workspace_bytes(Tc, Nc, BLK, Kb, ad),
                         D == 128 ? std::size_t{0} : gpu::attention_dense_workspace_bytes(Tc, Nc, ad)));
        td.push_back(tm.us([&](cudaStream_t s) {
          if (sm90) gpu::sm90_attention_prefill(q.data(), k.data(), v.data(), p0, Tc, Nc, ad, out.data(), s);
          else if (D == 128) gpu::attention_dense_prefill(q.data(), k.data(), v.data(), p0, Tc, Nc, ad, out.data(), s);
          else  // the prefill kernels are built for D = 128 only (tiny, small head dims): the split-K kernel
            gpu::attention_dense(q.data(), k.data(), v.data(), pos.data(), Tc, Nc, ad, out.data(), s, ws.data(), ws.size());
        }, 1, false));
        ti.push_back(tm.us([&](cudaStream_t s) {
          if (sm90_index) gpu::sm90_msa_index(iq.data(), ik.data(), p0, Tc, Nc, nb, md, scores.data(), s);
          else gpu::msa_index(iq.data(), ik.data(), pos.data(), Tc, Nc, nb, md, scores.data(), s);
        }, 1, false));
        ts.push_back(tm.us([&](cudaStream_t s) { gpu::msa_select(scores.data(), pos.data(), Tc, nb, md, sel.data(), s); }, 1, false));
        tp.push_back(tm.us([&](cudaStream_t s) {
          gpu::msa_attention_prefill(q.data(), k.data(), v.data(), pos.data(), sel.data(), Tc, Nc, BLK, Kb, ad, out.data(), s,
                                     ws.data(), ws.size());
        }, 1, false));
      }
      GpuPrefillPoint r;
      r.context = n;
      r.chunk = C;
      r.chunks = chunks;
      r.chunks_timed = static_cast<int>(idx.size());
      r.dense_kernel = sm90 ? "sm90_wgmma" : D == 128 ? "mma_sync" : "split_k";
      r.index_kernel = sm90_index ? "sm90_wgmma" : "mma_sync";
      r.sparse_kernel = gpu::msa_attention_prefill_uses_wgmma(D, BLK) ? "sm90_wgmma" : "mma_sync";
      r.dense_ms = extrapolate(idx, td, chunks) * 1e-3;
      r.index_ms = extrapolate(idx, ti, chunks) * 1e-3;
      r.select_ms = extrapolate(idx, ts, chunks) * 1e-3;
      r.sparse_ms = extrapolate(idx, tp, chunks) * 1e-3;
      r.msa_ms = r.index_ms + r.select_ms + r.sparse_ms;
      const AttnKeys keys = attn_keys_range(cfg, AttnType::MSA, 0, n);
      const AttnKeys dk = attn_keys_range(cfg, AttnType::DENSE, 0, n);
      r.dense_flops = 4.0 * Hq * D * static_cast<double>(dk.visible);
      r.index_flops = 2.0 * Hi * Di * static_cast<double>(keys.scored);
      r.sparse_flops = 4.0 * Hq * D * static_cast<double>(keys.attended);
      r.rest_ms = st.rest_prefill_us_per_token * static_cast<double>(n) * 1e-3;
      say(fmt::format("prefill n={} ({} of {} chunks timed): dense {:.1f} ms, MSA {:.1f} ms (index {:.1f}, select {:.1f}, "
                      "sparse {:.1f}) = {:.2f}x",
                      n, r.chunks_timed, r.chunks, r.dense_ms, r.msa_ms, r.index_ms, r.select_ms, r.sparse_ms,
                      r.dense_ms / r.msa_ms));
      st.prefill.push_back(r);
    }
  }
  return st;
}

}  // namespace m3::study
