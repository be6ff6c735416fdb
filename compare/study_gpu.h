// The GPU side of the cost study (issue 5, part 1; DESIGN §5, §10): one real-dimension layer's
// attention on the GPU, dense GQA vs MSA (index scoring + top-k selection + block-sparse attention),
// measured with CUDA events (medians, L2 flushed before every decode repetition; a decode point's
// nine quantities are timed in interleaved rounds, so a drift of the card's state moves them alike), for
//   decode: batch 1 and 8, one query per sequence at the end of a context n (bf16 and fp8 index-K);
//   prefill: one sequence of N tokens in chunks of `chunk` queries (the chunk at p0 attends keys
//            0..p0+chunk-1); dense with the fastest prefill kernel available (sm90 wgmma, else the
//            portable mma.sync one), MSA with msa_attention_prefill (KV-block-outer).
// Each point carries the analytic dense-equivalent and actual FLOPs, the necessary bytes, achieved
// TFLOP/s and GB/s, the fraction of the peaks measured in the same process (cuBLAS bf16 GEMM
// 8192^3; 1 GiB device copy, read + write), and the speedups. The rest of the layer (norms,
// projections, router, experts) is measured once per token count so the attention share of a
// layer's time is visible. Needs the CUDA build (M3_HAVE_GPU).
#pragma once

#include "reference/config.h"

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace m3::study {

struct GpuPeaks {
  double gemm_tflops = 0;  // cuBLAS bf16 GEMM 8192^3
  double copy_gbps = 0;    // device-to-device copy, read + write bytes
};

struct GpuDecodePoint {
  std::int64_t context = 0;
  int batch = 0;
  double dense_us = 0;
  double index_us = 0, index_fp8_us = 0, select_us = 0, sparse_us = 0;  // each kernel alone, unfused
  // The MSA step as the model runs it: the index scan, then msa_select_attention (the selection and
  // the sparse attention one fused kernel at decode-sized grids), back to back.
  double msa_us = 0, msa_fp8_us = 0;
  // A plain read of the index-K bytes (gpu::stream_read, L2 flushed, same events): the index
  // scan's own roofline, which a 1 GiB copy overstates at one sequence (a 256 MiB read reached
  // 3.76 TB/s against the copy's 4.21 on an H200, 2026-11-29).
  double read_us = 0, read_fp8_us = 0;
  double dense_bytes = 0, msa_bytes = 0, msa_fp8_bytes = 0;  // necessary bytes
  double dense_flops = 0, msa_flops = 0;
  double rest_us = 0;  // the rest of the layer for `batch` tokens (norms, projections, MoE)
};

struct GpuPrefillPoint {
  std::int64_t context = 0;
  int chunk = 0, chunks = 0, chunks_timed = 0;  // chunks_timed < chunks: the rest extrapolated
  std::string dense_kernel;                      // "sm90_wgmma", "mma_sync" or "split_k" (D != 128)
  std::string index_kernel;                      // "sm90_wgmma" (sm90_msa_index) or "mma_sync" (msa_index)
  std::string sparse_kernel;                     // msa_attention_prefill's tile kernel: "sm90_wgmma" or "mma_sync"
  double dense_ms = 0;
  double index_ms = 0, select_ms = 0, sparse_ms = 0, msa_ms = 0;
  double dense_flops = 0;                        // 2*Hq*D*sum(keys) x 2 (QK and PV), causal
  double index_flops = 0, sparse_flops = 0;      // actual
  double rest_ms = 0;                            // the rest of the layer for N tokens
};

struct GpuStudyOptions {
  std::int64_t min_context = 4096, max_context = 1 << 20;
  std::vector<int> batches = {1, 8};
  bool decode = true, prefill = true, rest = true;
  int chunk = 16384;           // prefill query chunk
  int decode_reps = 20;        // median over repetitions
  int max_timed_chunks = 8;    // past this many chunks a prefill point times an even sample
  std::uint64_t seed = 1;
};

struct GpuStudy {
  std::string device;
  GpuPeaks peaks;
  std::vector<GpuDecodePoint> decode;
  std::vector<GpuPrefillPoint> prefill;
  double rest_prefill_us_per_token = 0;  // layer minus attention, per token, at a 4096-token chunk
};

// Runs the study; `progress` (may be empty) receives one line per point.
GpuStudy run_gpu_study(const ModelConfig& cfg, const GpuStudyOptions& o,
                       const std::function<void(const std::string&)>& progress = {});

}  // namespace m3::study
