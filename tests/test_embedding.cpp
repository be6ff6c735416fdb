// Tests of ref::embedding (reference/ops/embedding.h): an exact row gather, both dtypes, with the
// first and last vocabulary ids, repeats, an empty sequence, and ids outside [0, V).
#include "reference/ops/embedding.h"

#include "tests/test_util.h"

#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using m3::Mat;
using m3::ref::embedding;
using m3::test::poison;

// A gather does no arithmetic: every output element must equal its table element bit for bit.
template <class T>
void check_gather() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const int V = 257, H = 33;
  const Mat<T> table = m3::test::randn<T>(V, H, g);  // [V, H]
  std::uniform_int_distribution<std::int32_t> id(0, V - 1);
  std::vector<std::int32_t> tokens{0, V - 1, 5, 5};  // ends of the vocabulary and a repeat
  for (int i = 0; i < 60; ++i) tokens.push_back(id(g));
  Mat<T> out(static_cast<Eigen::Index>(tokens.size()), H);  // [T, H]
  poison(out);
  embedding<T>(table, tokens, out);
  ASSERT_EQ(out.rows(), static_cast<Eigen::Index>(tokens.size()));
  ASSERT_EQ(out.cols(), H);
  EXPECT_GT(table.norm(), 0);
  for (std::size_t t = 0; t < tokens.size(); ++t)
    for (int c = 0; c < H; ++c)
      ASSERT_EQ(out(static_cast<Eigen::Index>(t), c), table(tokens[t], c))
          << "t=" << t << " c=" << c;
}
TEST(Embedding_f32, Gather) { check_gather<float>(); }
TEST(Embedding_f64, Gather) { check_gather<double>(); }

TEST(Embedding_f32, OneTokenAndEmpty) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const Mat<float> table = m3::test::randn<float>(4, 6, g);  // [V, H]
  Mat<float> out(3, 3);
  poison(out);
  const std::vector<std::int32_t> one{3};
  embedding<float>(table, one, out);
  ASSERT_EQ(out.rows(), 1);
  EXPECT_EQ(out.row(0), table.row(3));
  embedding<float>(table, std::span<const std::int32_t>{}, out);
  EXPECT_EQ(out.rows(), 0);
  EXPECT_EQ(out.cols(), 6);
}

// Throws std::out_of_range naming the position and the id of the first bad token.
void expect_out_of_range(const std::vector<std::int32_t>& tokens, const std::string& position,
                         const std::string& id) {
  const Mat<double> table = Mat<double>::Ones(50, 4);  // V = 50
  Mat<double> out;
  try {
    embedding<double>(table, tokens, out);
    FAIL() << "expected std::out_of_range";
  } catch (const std::out_of_range& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("position " + position), std::string::npos) << msg;
    EXPECT_NE(msg.find("id " + id), std::string::npos) << msg;
  }
}
TEST(Embedding_f64, IdTooLarge_Throws) { expect_out_of_range({1, 49, 50, 51}, "2", "50"); }
TEST(Embedding_f64, IdNegative_Throws) { expect_out_of_range({0, -1}, "1", "-1"); }
TEST(Embedding_f64, IdFarOut_Throws) { expect_out_of_range({2147483647}, "0", "2147483647"); }

}  // namespace
