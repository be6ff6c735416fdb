// MSA block-sparse attention launcher; see msa_attention.h. The kernels are the split-K attention
// kernels of attention_dense.cu in their sparse form: a CTA's keys are the rows of its selected
// blocks (at most 64 selection slots a CTA), masked past the query's position; paged caches are
// translated per selected block (BLK dividing the 128-row page) or per row (other BLK).
#include "gpu/kernels/msa_attention.h"

#include "gpu/kernels/attention_dense.h"
#include "gpu/kernels/msa_select.h"

#include <atomic>
#include <cstdint>
#include <string>

namespace m3::gpu {

std::size_t msa_attention_workspace_bytes(int T, int k_blk, const AttnDims& dims, int B) {
  if (T <= 0 || B <= 0 || k_blk <= 0 || dims.Hkv <= 0 || dims.Hq <= 0) return 0;
  const auto plan = detail::plan_sparse_splits(B, T, k_blk, dims);
  return detail::attention_workspace_bytes(B, T, dims, plan.splits);
}

namespace {
// The split-K launch of msa_attention's sparse attention (the plan for this device), without the
// selection's source: msa_attention sets a.sel, msa_select_attention the fused-selection fields.
detail::AttnLaunch sparse_launch(const bf16* q, const bf16* k, const bf16* v, const std::int64_t* q_pos, int T, int N,
                                 int blk, int k_blk, const AttnDims& dims, bf16* out, int B, CachePages pages) {
  const auto plan = detail::plan_sparse_splits(B, T, k_blk, dims);
  detail::AttnLaunch a;
  a.q = q; a.k = k; a.v = v; a.q_pos = q_pos; a.out = out;
  a.pages = pages;
  a.B = B; a.T = T; a.N = N; a.Hq = dims.Hq; a.Hkv = dims.Hkv; a.D = dims.D;
  a.blk = blk;
  a.k_blk = k_blk;
  a.splits = plan.splits;
  a.chunk = plan.chunk;
  return a;
}
}  // namespace

void msa_attention(const bf16* q, const bf16* k, const bf16* v, const std::int64_t* q_pos,
                   const std::int32_t* sel, int T, int N, int blk, int k_blk, const AttnDims& dims,
                   bf16* out, cudaStream_t s, void* workspace, std::size_t workspace_bytes, int B,
                   CachePages pages) {
  detail::check_attn_args("msa_attention", q, k, v, T, N, dims, B, pages);
  if (blk <= 0 || k_blk <= 0)
    throw GpuError("msa_attention: blk = " + std::to_string(blk) + ", k_blk = " + std::to_string(k_blk) +
                   ", expected both > 0");
  if (T == 0) return;
  if (q_pos == nullptr || sel == nullptr || out == nullptr)
    throw GpuError("msa_attention: q_pos, sel or out is null, expected device pointers");
  detail::AttnLaunch a = sparse_launch(q, k, v, q_pos, T, N, blk, k_blk, dims, out, B, pages);
  a.sel = sel;
  detail::attention_run(a, workspace, workspace_bytes, s);
}

namespace {
std::atomic<bool> g_fusion{true};
}  // namespace

void detail::set_select_attention_fusion(bool on) { g_fusion.store(on, std::memory_order_relaxed); }

bool msa_select_attention(const float* scores, int NB, const MsaDims& md, const bf16* q, const bf16* k,
                          const bf16* v, const std::int64_t* q_pos, int T, int N, const AttnDims& dims,
                          std::int32_t* sel, bf16* out, cudaStream_t s, void* workspace,
                          std::size_t workspace_bytes, int B, CachePages pages) {
  // Everything msa_select and msa_attention check, up front and whichever path runs: an argument
  // is accepted or refused the same way on every device, and nothing launches before a refusal.
  const std::string o = "msa_select_attention";
  if (dims.Hkv != md.Hi)
    throw GpuError(o + ": Hkv = " + std::to_string(dims.Hkv) + ", Hi = " + std::to_string(md.Hi) +
                   ", expected equal (KV group g attends index head g's selection)");
  detail::check_attn_args(o.c_str(), q, k, v, T, N, dims, B, pages);
  detail::check_select_args(o.c_str(), scores, q_pos, T, NB, md, sel, B);
  if (T == 0) return false;
  if (out == nullptr) throw GpuError(o + ": out is null, expected a device pointer");
  // The unfused path's workspace, whichever runs (T > 0: a non-zero need).
  detail::check_attn_workspace(o.c_str(), workspace, workspace_bytes, msa_attention_workspace_bytes(T, md.K_blk, dims, B));
  if (g_fusion.load(std::memory_order_relaxed)) {
    detail::AttnLaunch a = sparse_launch(q, k, v, q_pos, T, N, md.BLK, md.K_blk, dims, out, B, pages);
    a.scores = scores; a.sel_out = sel;
    a.NB = NB; a.local = md.local_blocks; a.init = md.init_blocks;
    if (detail::select_attention_run(a, s)) return true;
  }
  msa_select(scores, q_pos, T, NB, md, sel, s, B);
  msa_attention(q, k, v, q_pos, sel, T, N, md.BLK, md.K_blk, dims, out, s, workspace, workspace_bytes, B, pages);
  return false;
}

}  // namespace m3::gpu
