// The vectorizable softmax exp against std::exp.
#include <cmath>
#include <limits>
#include <vector>

#include "check.h"
#include "core/softmax_exp.h"

using namespace medmtl::core;

int main() {
  double worst = 0;
  for (double x = -87.0; x <= 88.0; x += 1e-3) {
    const float xf = static_cast<float>(x);
    const double exact = std::exp(static_cast<double>(xf));
    worst = std::fmax(worst, std::fabs(softmax_exp(xf) - exact) / exact);
  }
  CHECK(worst < 3e-7);
  CHECK(softmax_exp(-std::numeric_limits<float>::infinity()) == 0.0f);
  CHECK(softmax_exp(-1000.0f) == 0.0f);
  CHECK(softmax_exp(0.0f) == 1.0f);
  CHECK(std::isnan(softmax_exp(std::numeric_limits<float>::quiet_NaN())));
  CHECK(softmax_exp(-1.0) == std::exp(-1.0));

  std::vector<float> row = {1.0f, -std::numeric_limits<float>::infinity(), 3.0f, 2.5f, -4.0f};
  const float peak = row_max(row.data(), static_cast<int64_t>(row.size()));
  CHECK(peak == 3.0f);
  const std::vector<float> before = row;
  const float sum = exp_shifted_sum(row.data(), static_cast<int64_t>(row.size()), peak);
  double expected = 0;
  for (size_t j = 0; j < row.size(); ++j) {
    const double e = std::exp(static_cast<double>(before[j]) - 3.0);
    CHECK_NEAR(row[j], e, 1e-6);
    expected += e;
  }
  CHECK_NEAR(sum, expected, 1e-6);
  CHECK(row[1] == 0.0f);
  return check_failures();
}
