// Schema checks of PyTorch's private operators (see private_ops.h).
#include "private_ops.h"

#include <cstdlib>
#include <mutex>
#include <string_view>
#include <unordered_map>

namespace medmtl {

const PrivateOp kFusedConvolution{
    "mkldnn::_convolution_pointwise", "",
    "mkldnn::_convolution_pointwise(Tensor X, Tensor W, Tensor? B, int[] padding, int[] stride, int[] dilation, "
    "int groups, str attr, Scalar?[] scalars, str? algorithm) -> Tensor Y"};

const PrivateOp kFusedConvolutionAddedInto{
    "mkldnn::_convolution_pointwise_", "binary",
    "mkldnn::_convolution_pointwise_.binary(Tensor(a!) other, Tensor X, Tensor W, Tensor? B, int[] padding, "
    "int[] stride, int[] dilation, int groups, str binary_attr, Scalar? alpha, str? unary_attr, "
    "Scalar?[] unary_scalars, str? unary_algorithm) -> Tensor(a!) Y"};

namespace {

const PrivateOp* const kAll[] = {&kFusedConvolution, &kFusedConvolutionAddedInto};

std::string full_name(const PrivateOp& op) {
  return std::string(op.name) + (op.overload[0] != '\0' ? std::string(".") + op.overload : std::string());
}

struct Checked {
  std::optional<c10::OperatorHandle> handle;
  std::string reason;  // empty when handle is set
};

Checked check(const PrivateOp& op) {
  std::string expected = op.expected_schema;
  if (const char* forced = std::getenv("MEDMTL_TEST_SCHEMA_MISMATCH"); forced != nullptr && op.name == std::string_view(forced))
    expected += " (MEDMTL_TEST_SCHEMA_MISMATCH)";
  const std::optional<c10::OperatorHandle> handle = c10::Dispatcher::singleton().findSchema({op.name, op.overload});
  if (!handle.has_value()) return {std::nullopt, "not registered in this torch (a build without oneDNN?)"};
  const std::string found = c10::toString(handle->schema());
  if (found != expected)
    return {std::nullopt, "schema differs from the one medmtl was written for: expected `" + expected + "`, found `" +
                              found + "`"};
  return {handle, ""};
}

const Checked& checked(const PrivateOp& op) {
  static std::mutex mutex;
  static std::unordered_map<const PrivateOp*, Checked> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(&op);
  if (it == cache.end()) it = cache.emplace(&op, check(op)).first;
  return it->second;  // unordered_map references stay valid across inserts
}

}  // namespace

const std::optional<c10::OperatorHandle>& checked_private_op(const PrivateOp& op) { return checked(op).handle; }

std::vector<std::string> private_op_fallbacks() {
  std::vector<std::string> out;
  for (const PrivateOp* op : kAll)
    if (const Checked& c = checked(*op); !c.handle.has_value()) out.push_back(full_name(*op) + ": " + c.reason);
  return out;
}

}  // namespace medmtl
