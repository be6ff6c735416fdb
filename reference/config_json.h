// The field readers of config.json, shared by its two parsers: the text model's (config.cpp,
// parse_config_json) and the vision tower's (datasets/checkpoint_vision.cpp, parse_vision_config).
// Every error is a ConfigError "<where>: field '<key>' <what>", naming the file (and the block) and
// the rule the value broke. Not a public interface: it includes nlohmann/json, which the two
// libraries link privately.
#pragma once

#include "reference/config.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace m3::detail {

// Typed access to the fields of one JSON object.
struct ConfigFields {
  const nlohmann::json* obj = nullptr;  // nullptr: no object at all (every field absent)
  std::string where;                    // the messages' prefix: the file, or "<file>: <block>"

  // The field's value; nullptr where it is absent or null.
  const nlohmann::json* find(std::string_view key) const {
    if (!obj) return nullptr;
    const auto it = obj->find(std::string(key));
    return it == obj->end() || it->is_null() ? nullptr : &*it;
  }
  [[noreturn]] void fail(std::string_view key, std::string_view what) const {
    throw ConfigError(fmt::format("{}: field '{}' {}", where, key, what));
  }
  // A boolean, integer or number into out; false (out untouched) where absent.
  template <class T>
  bool get(std::string_view key, T& out) const {
    const nlohmann::json* v = find(key);
    if (!v) return false;
    if constexpr (std::is_same_v<T, bool>) {
      if (!v->is_boolean()) fail(key, "must be a boolean");
      out = v->get<bool>();
    } else if constexpr (std::is_integral_v<T>) {
      if (!v->is_number_integer()) fail(key, "must be an integer");
      out = v->get<T>();
    } else {
      if (!v->is_number()) fail(key, "must be a number");
      out = v->get<T>();
    }
    return true;
  }
  template <class T>
  void require(std::string_view key, T& out) const {
    if (!get(key, out)) fail(key, "is required but missing");
  }
};

// The same, remembering which fields were absent (they keep a preset's value: the caller says so),
// and checking ranges with the value found in the message.
struct ConfigFieldsOrPreset : ConfigFields {
  std::vector<std::string> absent;

  // An integer >= min (1: a size; 0: a count that may be empty) and within int.
  bool get_int(std::string_view key, int& out, int min = 1) {
    const nlohmann::json* v = find(key);
    if (!v) return absent.emplace_back(key), false;
    if (!v->is_number_integer()) fail(key, fmt::format("must be an integer, found {}", v->dump()));
    const auto x = v->get<std::int64_t>();
    if (x < min || x > std::numeric_limits<int>::max()) fail(key, fmt::format("= {}, expected an integer >= {}", x, min));
    out = static_cast<int>(x);
    return true;
  }
  // A number > 0.
  void get_pos(std::string_view key, double& out) {
    const nlohmann::json* v = find(key);
    if (!v) return void(absent.emplace_back(key));
    if (!v->is_number()) fail(key, fmt::format("must be a number, found {}", v->dump()));
    if (!(v->get<double>() > 0)) fail(key, fmt::format("= {}, expected > 0", v->dump()));
    out = v->get<double>();
  }
};

}  // namespace m3::detail
