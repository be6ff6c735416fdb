// Greedy decoding with MTP drafts; see mtp.h for the schedule.
#include "reference/mtp.h"

#include "reference/mtp_loop.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

namespace m3 {

std::vector<std::int32_t> generate_mtp(Model& main, std::span<Model* const> modules,
                                       std::span<const std::int32_t> prompt, int steps, int k, MtpStats* stats) {
  const ModelConfig& c = main.config();
  if (modules.empty()) throw std::invalid_argument("generate_mtp: no MTP modules");
  if (k < 1) throw std::invalid_argument(fmt::format("generate_mtp: k = {} drafts a round, expected >= 1", k));
  if (steps < 0) throw std::invalid_argument(fmt::format("generate_mtp: steps = {}, expected >= 0", steps));
  for (std::size_t i = 0; i < modules.size(); ++i) {
    const Model* m = modules[i];
    if (!m || !m->takes_hidden_states() || m->config().hidden_size != c.hidden_size ||
        m->config().vocab_size != c.vocab_size || m->precision() != main.precision())
      throw std::invalid_argument(fmt::format(
          "generate_mtp: module {} is not an MTP module's model of this main model (mtp_module_config + "
          "generate_mtp_module, hidden_size {}, vocab {}, precision {})",
          i, c.hidden_size, c.vocab_size, precision_name(main.precision())));
  }
  return detail::mtp_loop<Model>(main, modules, prompt, steps, k, stats);
}

}  // namespace m3
