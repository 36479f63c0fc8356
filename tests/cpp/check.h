// A minimal check macro for the torch-free core tests: count failures, print
// where, and let main() return the count (non-zero fails ctest).
#pragma once

#include <cmath>
#include <cstdio>

inline int& check_failures() {
  static int failures = 0;
  return failures;
}

#define CHECK(cond)                                                      \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++check_failures();                                                \
    }                                                                    \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                        \
  do {                                                                               \
    const double va = (a), vb = (b);                                                 \
    if (!(std::fabs(va - vb) <= (tol) * (1.0 + std::fabs(vb)))) {                    \
      std::fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s = %.17g, %s = %.17g\n", __FILE__, \
                   __LINE__, #a, va, #b, vb);                                        \
      ++check_failures();                                                            \
    }                                                                                \
  } while (0)
