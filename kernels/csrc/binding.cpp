// Python binding of the sensitivity kernels (sensitivity.h) through torch's extension API: checks the
// tensors' device, dtype, layout and sizes, allocates the split-reduction workspace, and launches on
// the current stream. Tensor conventions: kernels/ops.py; shapes: sensitivity.h.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <optional>

#include "sensitivity.h"

namespace {

constexpr int64_t kBlockForm = 2;
constexpr int64_t kComplexForm = 1;

void check_status(int status, const char* what) {
  TORCH_CHECK(status == 0, "rlmem kernels: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

void check_tensor(const at::Tensor& tensor, const at::Tensor& like, int64_t numel, const char* name) {
  TORCH_CHECK(tensor.is_cuda() && tensor.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(tensor.scalar_type() == at::kFloat, name, " must be float32, got ", tensor.scalar_type());
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(tensor.numel() == numel, name, " has ", tensor.numel(), " elements, expected ", numel);
}

struct Shape {
  int64_t form, k, T, B, N, rows, columns, v_len;
  int64_t unit_reals() const { return form == kBlockForm ? k : (form == kComplexForm ? 2 : 1); }
  int64_t jacobian_reals() const { return form == kBlockForm ? k * k : unit_reals(); }
  int64_t gradient_reals() const { return form == kComplexForm ? 2 : 1; }
  int64_t width() const { return columns > 0 ? columns : 1; }
  int64_t sensitivity_numel() const { return B * N * rows * unit_reals() * width(); }
  int64_t gradient_numel() const { return N * rows * width() * gradient_reals(); }
};

// Sizes from the Jacobians [T, B, N, ...] and checks of every tensor against them.
Shape shape_of(int64_t form, int64_t k, int64_t rows, int64_t columns, const at::Tensor& jacobians,
               const at::Tensor& u, const std::optional<at::Tensor>& v) {
  TORCH_CHECK(form >= 0 && form <= 2, "unknown unit form ", form);
  TORCH_CHECK(jacobians.dim() >= 3, "jacobians must be [T, B, N, ...]");
  Shape s{form, k, jacobians.size(0), jacobians.size(1), jacobians.size(2), rows, columns, 0};
  check_tensor(jacobians, jacobians, s.T * s.B * s.N * s.jacobian_reals(), "jacobians");
  check_tensor(u, jacobians, s.T * s.B * s.N * rows * s.unit_reals(), "u");
  if (v.has_value()) {
    s.v_len = columns > 0 ? columns : v->size(-1);
    check_tensor(*v, jacobians, s.T * s.B * s.v_len, "v");
    if (columns > 0) s.v_len = 0;
  } else {
    TORCH_CHECK(columns == 0, "a matrix group needs v");
  }
  return s;
}

// A workspace for a gradient reduction split over slices of the batch, or an undefined tensor.
at::Tensor workspace_for(const Shape& s, const at::Tensor& like) {
  int multiprocessors = 0;
  check_status(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, like.get_device()),
               "reading the number of multiprocessors");
  const int splits = rlmem_gradient_splits(s.form, s.k, s.B, s.N, s.rows, s.columns, multiprocessors);
  if (splits <= 1) return at::Tensor();
  return at::empty({splits * s.gradient_numel()}, like.options());
}

int splits_of(const at::Tensor& workspace, const Shape& s) {
  return workspace.defined() ? static_cast<int>(workspace.numel() / s.gradient_numel()) : 1;
}

const float* data_or_null(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->data_ptr<float>() : nullptr;
}

// S_T (into s_out) from S_0 over the window; with errors, also Σ_t Σ_b ⟨e_t, S_t⟩ into grad.
void forward(int64_t form, int64_t k, int64_t rows, int64_t columns, const at::Tensor& jacobians, const at::Tensor& u,
             const std::optional<at::Tensor>& v, const at::Tensor& s0, const at::Tensor& s_out,
             const std::optional<at::Tensor>& errors, const std::optional<at::Tensor>& grad, bool accumulate) {
  const Shape s = shape_of(form, k, rows, columns, jacobians, u, v);
  check_tensor(s0, jacobians, s.sensitivity_numel(), "sensitivity");
  check_tensor(s_out, jacobians, s.sensitivity_numel(), "out");
  at::Tensor workspace;
  if (errors.has_value()) {
    TORCH_CHECK(grad.has_value(), "errors need a gradient tensor to accumulate into");
    check_tensor(*errors, jacobians, s.T * s.B * s.N * s.unit_reals(), "errors");
    check_tensor(*grad, jacobians, s.gradient_numel(), "grad");
    workspace = workspace_for(s, jacobians);
  }
  const c10::cuda::CUDAGuard guard(jacobians.device());
  const int status = rlmem_sensitivity_forward(
      s.form, s.k, s.T, s.B, s.N, s.rows, s.columns, s.v_len, jacobians.data_ptr<float>(), u.data_ptr<float>(),
      data_or_null(v), s0.data_ptr<float>(), s_out.data_ptr<float>(), data_or_null(errors),
      errors.has_value() ? grad->data_ptr<float>() : nullptr, accumulate, splits_of(workspace, s),
      workspace.defined() ? workspace.data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream());
  check_status(status, "sensitivity forward");
}

// The window's gradient (equation (4)) from the adjoint δ, into grad.
void gradient(int64_t form, int64_t k, int64_t rows, int64_t columns, const at::Tensor& jacobians,
              const at::Tensor& adjoint, const at::Tensor& u, const std::optional<at::Tensor>& v,
              const std::optional<at::Tensor>& s0, const at::Tensor& grad, bool accumulate) {
  const Shape s = shape_of(form, k, rows, columns, jacobians, u, v);
  check_tensor(adjoint, jacobians, s.T * s.B * s.N * s.unit_reals(), "adjoint");
  if (s0.has_value()) check_tensor(*s0, jacobians, s.sensitivity_numel(), "sensitivity");
  check_tensor(grad, jacobians, s.gradient_numel(), "grad");
  const at::Tensor workspace = workspace_for(s, jacobians);
  const c10::cuda::CUDAGuard guard(jacobians.device());
  const int status = rlmem_sensitivity_gradient(
      s.form, s.k, s.T, s.B, s.N, s.rows, s.columns, s.v_len, jacobians.data_ptr<float>(), adjoint.data_ptr<float>(),
      u.data_ptr<float>(), data_or_null(v), data_or_null(s0), grad.data_ptr<float>(), accumulate,
      splits_of(workspace, s), workspace.defined() ? workspace.data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream());
  check_status(status, "sensitivity gradient");
}

// δ (into out) from the same-step errors.
void adjoint(int64_t form, int64_t k, const at::Tensor& jacobians, const at::Tensor& errors, const at::Tensor& out) {
  TORCH_CHECK(form >= 0 && form <= 2, "unknown unit form ", form);
  TORCH_CHECK(jacobians.dim() >= 3, "jacobians must be [T, B, N, ...]");
  const Shape s{form, k, jacobians.size(0), jacobians.size(1), jacobians.size(2), 1, 0, 0};
  check_tensor(jacobians, jacobians, s.T * s.B * s.N * s.jacobian_reals(), "jacobians");
  check_tensor(errors, jacobians, s.T * s.B * s.N * s.unit_reals(), "errors");
  check_tensor(out, jacobians, s.T * s.B * s.N * s.unit_reals(), "out");
  const c10::cuda::CUDAGuard guard(jacobians.device());
  const int status = rlmem_adjoint(s.form, s.k, s.T, s.B, s.N, jacobians.data_ptr<float>(), errors.data_ptr<float>(),
                                   out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  check_status(status, "adjoint");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels for the sensitivity recursion of rlmem/rtrl.py";
  m.def("forward", &forward, "S_0 -> S_T over a window (equation (3)); with errors, also equation (2) into grad",
        py::arg("form"), py::arg("k"), py::arg("rows"), py::arg("columns"), py::arg("jacobians"), py::arg("u"),
        py::arg("v"), py::arg("sensitivity"), py::arg("out"), py::arg("errors"), py::arg("grad"),
        py::arg("accumulate"));
  m.def("gradient", &gradient, "the window's parameter gradient from the adjoint (equation (4))", py::arg("form"),
        py::arg("k"), py::arg("rows"), py::arg("columns"), py::arg("jacobians"), py::arg("adjoint"), py::arg("u"),
        py::arg("v"), py::arg("sensitivity"), py::arg("grad"), py::arg("accumulate"));
  m.def("adjoint", &adjoint, "the adjoint of equation (4) from the same-step errors", py::arg("form"), py::arg("k"),
        py::arg("jacobians"), py::arg("errors"), py::arg("out"));
}
