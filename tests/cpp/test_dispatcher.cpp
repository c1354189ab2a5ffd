// Calls mamba_ext ops through the dispatcher with no Python, as a LibTorch user would, and checks
// them against ATen computations. Run by ctest (see CMakeLists.txt).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

double rel_error(const at::Tensor& out, const at::Tensor& ref) {
  return ((out.to(at::kDouble) - ref.to(at::kDouble)).norm() / ref.to(at::kDouble).norm())
      .item<double>();
}

using OptTensor = std::optional<at::Tensor>;

void test_causal_conv1d_fwd() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mamba_ext::causal_conv1d_fwd", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(
                    const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                    const OptTensor&, bool, bool)>();
  const int64_t batch = 2, dim = 5, seqlen = 37, width = 4;
  at::Tensor x = at::randn({batch, dim, seqlen});  // (batch, dim, seqlen)
  at::Tensor weight = at::randn({dim, width});     // (dim, width)
  at::Tensor bias = at::randn({dim});              // (dim,)
  auto [out, final_states] = op.call(x, weight, bias, std::nullopt, std::nullopt, true, true);
  // The same conv as a grouped ATen conv1d padded on the left.
  at::Tensor ref = at::silu(
      at::conv1d(x, weight.unsqueeze(1), bias, 1, width - 1, 1, dim).slice(2, 0, seqlen));
  expect(rel_error(out, ref) < 1e-5, "causal_conv1d_fwd matches at::conv1d");
  expect(at::equal(final_states, x.slice(2, seqlen - (width - 1))),
         "causal_conv1d_fwd final_states are the last width - 1 inputs");

  bool threw = false;
  try {
    op.call(x, at::randn({dim, 7}), bias, std::nullopt, std::nullopt, false, false);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("weight") != std::string::npos;
  }
  expect(threw, "causal_conv1d_fwd rejects width 7 with an error naming weight");
}

void test_selective_scan_fwd() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mamba_ext::selective_scan_fwd", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                    const OptTensor&, const OptTensor&, int64_t, bool, bool)>();
  const int64_t batch = 2, dim = 3, dstate = 4, seqlen = 9;
  at::Tensor u = at::randn({batch, dim, seqlen});       // (batch, dim, seqlen)
  at::Tensor delta = at::rand({batch, dim, seqlen});    // (batch, dim, seqlen)
  at::Tensor A = -at::rand({dim, dstate});              // (dim, dstate)
  at::Tensor B = at::randn({batch, 1, dstate, seqlen});  // (batch, ngroups, dstate, seqlen)
  at::Tensor C = at::randn({batch, 1, dstate, seqlen});  // (batch, ngroups, dstate, seqlen)
  at::Tensor D = at::randn({dim});                       // (dim,)
  // return_checkpoints: the CPU kernel keeps none (an empty tensor).
  auto [out, last_state, checkpoints] = op.call(u, delta, A, B, C, D, std::nullopt, std::nullopt,
                                                std::nullopt, std::nullopt, 0, false, true);
  // The recurrence step by step in ATen.
  at::Tensor h = at::zeros({batch, dim, dstate});
  at::Tensor ref = at::empty({batch, dim, seqlen});
  for (int64_t t = 0; t < seqlen; ++t) {
    at::Tensor dt = delta.select(2, t).unsqueeze(-1);                            // (batch, dim, 1)
    at::Tensor Bt = B.select(3, t), Ct = C.select(3, t);                         // (batch, 1, dstate)
    h = at::exp(dt * A) * h + dt * Bt * u.select(2, t).unsqueeze(-1);
    ref.select(2, t).copy_((h * Ct).sum(-1) + D * u.select(2, t));
  }
  expect(rel_error(out, ref) < 1e-5, "selective_scan_fwd matches the recurrence");
  expect(rel_error(last_state, h) < 1e-5, "selective_scan_fwd last_state matches");
  expect(checkpoints.numel() == 0, "selective_scan_fwd keeps no checkpoints on the CPU");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_causal_conv1d_fwd();
  test_selective_scan_fwd();
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
