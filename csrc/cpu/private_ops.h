// PyTorch's private operators the CPU kernels call through the dispatcher
// with hand-built argument stacks (oneDNN's fused convolutions, registered by
// PyTorch's mkldnn build for Inductor). They are not a stable API: each one's
// schema is compared, once when medmtl._C loads, with the schema the stacks
// were written for (torch 2.14). An op that is missing or whose schema differs
// is not called: the kernels take the public path instead (at::conv2d), and
// private_op_fallbacks() says why (medmtl info prints it).
//
// Test hook: MEDMTL_TEST_SCHEMA_MISMATCH=<op name> (e.g.
// mkldnn::_convolution_pointwise) makes that op's expected schema differ, so
// that the fallback can be tested with the installed torch.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <vector>

namespace medmtl {

// The dispatcher handle of operator `name`.`overload` when it is registered
// with the expected schema, else nullopt (and a reason in
// private_op_fallbacks()). Checked once per op.
struct PrivateOp {
  const char* name;
  const char* overload;
  const char* expected_schema;  // c10::toString(schema) of the torch the stacks were written for
};

// The ops, in this order: kFusedConvolution, kFusedConvolutionAddedInto.
extern const PrivateOp kFusedConvolution;
extern const PrivateOp kFusedConvolutionAddedInto;

const std::optional<c10::OperatorHandle>& checked_private_op(const PrivateOp& op);

// Checks every private op (once) and returns, for each one that will not be
// called, "<name>[.<overload>]: <reason>"; empty when all of them are used.
std::vector<std::string> private_op_fallbacks();

}  // namespace medmtl
