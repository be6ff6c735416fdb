// Greedy decoding with MTP drafts on the GPU; see mtp.h.
#include "gpu/mtp.h"

#include "reference/mtp_loop.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>
#include <string>

namespace m3::gpu {

std::vector<std::int32_t> generate_mtp(Model& main, std::span<Model* const> modules, std::span<const std::int32_t> prompt,
                                       int steps, int k, MtpStats* stats) {
  const ModelConfig& c = main.config();
  if (modules.empty()) throw std::invalid_argument("gpu::generate_mtp: no MTP modules");
  if (k < 1) throw std::invalid_argument(fmt::format("gpu::generate_mtp: k = {} drafts a round, expected >= 1", k));
  if (steps < 0) throw std::invalid_argument(fmt::format("gpu::generate_mtp: steps = {}, expected >= 0", steps));
  if (main.takes_hidden_states())
    throw std::invalid_argument("gpu::generate_mtp: the main model is an MTP module's model (it takes hidden states)");
  // generate_mtp reads every row of a check's logits and hands whole prompts to forward (the main
  // prefill, each module's first catch-up) and k + 1 tokens to each check.
  const auto need = static_cast<std::int64_t>(std::max<std::size_t>(prompt.size(), static_cast<std::size_t>(k) + 1));
  auto check_options = [&](const Model& m, const std::string& who) {
    if (m.options().last_logits_only)
      throw std::invalid_argument(fmt::format("gpu::generate_mtp: {} was made with last_logits_only: the check reads "
                                              "every row of its logits",
                                              who));
    if (m.options().max_tokens < need)
      throw std::invalid_argument(fmt::format("gpu::generate_mtp: {} has max_tokens = {}, expected >= {} (the prompt, "
                                              "and k + 1)",
                                              who, m.options().max_tokens, need));
  };
  check_options(main, "the main model");
  for (std::size_t i = 0; i < modules.size(); ++i) {
    const Model* m = modules[i];
    if (!m || m == &main || !m->takes_hidden_states() || m->config().hidden_size != c.hidden_size ||
        m->config().vocab_size != c.vocab_size)
      throw std::invalid_argument(fmt::format(
          "gpu::generate_mtp: module {} is not an MTP module's model of this main model (mtp_module_config + "
          "generate_mtp_module weights, hidden_size {}, vocab {})",
          i, c.hidden_size, c.vocab_size));
    check_options(*m, fmt::format("module {}", i));
  }
  return m3::detail::mtp_loop<Model>(main, modules, prompt, steps, k, stats);
}

}  // namespace m3::gpu
