// Greedy decoding with MTP drafts on the GPU, twin of m3::generate_mtp (reference/mtp.h): the same
// draft-and-check schedule (reference/mtp_loop.h, one template for both engines) over gpu::Model
// engines, the main model and one gpu::Model per MTP module (mtp_module_config +
// generate_mtp_module weights):
//
//   m3::gpu::Model main(cfg, w), mtp0(m3::mtp_module_config(cfg), m3::generate_mtp_module(cfg, 0, seed, w));
//   m3::gpu::Model* mods[] = {&mtp0};
//   m3::MtpStats st;
//   auto toks = m3::gpu::generate_mtp(main, mods, prompt, 64, 2, &st);
//
// Hidden states travel through the host between the engines (forward's hidden_out / h_in as MatD,
// final_norm on the device): correct and simple, a few H-wide rows a round; a fused device path
// would matter only for MTP throughput, which no issue measures yet.
#pragma once

#include "gpu/model.h"
#include "reference/mtp.h"

#include <cstdint>
#include <span>
#include <vector>

namespace m3::gpu {

// As m3::generate_mtp; throws std::invalid_argument for no modules, a module that is not an MTP
// module's model of `main` (takes_hidden_states, same hidden_size and vocabulary), k < 1 or steps < 0.
std::vector<std::int32_t> generate_mtp(Model& main, std::span<Model* const> modules, std::span<const std::int32_t> prompt,
                                       int steps, int k, MtpStats* stats = nullptr);

}  // namespace m3::gpu
