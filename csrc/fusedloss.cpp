// The extension module fusedloss._C: the op schemas (one place) and a small
// Python module whose import runs the TORCH_LIBRARY initializers.
//
// The schema text is python/fusedloss/ops.py's FWD_SCHEMA / BWD_SCHEMA, character
// for character; tests/test_cpu_kernel.py checks that they agree.
#include <Python.h>
#include <torch/library.h>

#include "autograd.h"
#include "cpu/kernels.h"

TORCH_LIBRARY(fusedloss, m) {
  m.def(
      "ext_fwd(Tensor logits, Tensor target, Tensor? weight, int variant, int reduction, "
      "int ignore_index, float label_smoothing, float alpha, float beta, float gamma, "
      "float z_loss, float softcap, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ext_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor stats, "
      "int variant, int reduction, int ignore_index, float label_smoothing, float alpha, "
      "float beta, float gamma, float z_loss, float softcap) -> Tensor");
  // Mixup's two targets: ops_mix.MIX_FWD_SCHEMA / MIX_BWD_SCHEMA.
  m.def(
      "ext_mix_fwd(Tensor logits, Tensor target_a, Tensor target_b, Tensor lam, Tensor? weight, "
      "int variant, int reduction, int ignore_index, float label_smoothing, float alpha, float beta, "
      "float gamma, float z_loss, float softcap, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ext_mix_bwd(Tensor grad_loss, Tensor logits, Tensor target_a, Tensor target_b, Tensor lam, "
      "Tensor? weight, Tensor stats, int variant, int reduction, int ignore_index, float label_smoothing, "
      "float alpha, float beta, float gamma, float z_loss, float softcap) -> Tensor");
  // Class-probability targets (ce): ops.SOFT_FWD_SCHEMA / ops.SOFT_BWD_SCHEMA.
  m.def(
      "ext_soft_fwd(Tensor logits, Tensor probs, Tensor? weight, int reduction, "
      "float label_smoothing, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ext_soft_bwd(Tensor grad_loss, Tensor logits, Tensor probs, Tensor? weight, Tensor stats, "
      "int reduction, float label_smoothing) -> Tensor");
  // Class-probability targets, every loss (the expected loss): ops.SOFT_LOSS_FWD_SCHEMA /
  // ops.SOFT_LOSS_BWD_SCHEMA. Stats: lse, S = sum_k w_k q'_k, log(1 - p_w), w.
  m.def(
      "ext_soft_loss_fwd(Tensor logits, Tensor probs, Tensor? weight, int variant, int reduction, "
      "float label_smoothing, float alpha, float beta, float gamma, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ext_soft_loss_bwd(Tensor grad_loss, Tensor logits, Tensor probs, Tensor? weight, Tensor stats, "
      "int variant, int reduction, float label_smoothing, float alpha, float beta, float gamma) -> Tensor");
  // bce of a vocabulary-parallel row given its global numbers (CPU only; layout in
  // cpu/ops_cpu_bce_parallel.cpp): ops.BCE_PARTIAL_SCHEMA / ops.BCE_GLOBAL_BWD_SCHEMA.
  m.def("ext_bce_partial(Tensor logits, Tensor stats, Tensor slice_idx, float softcap) -> Tensor");
  m.def(
      "ext_bce_global_bwd(Tensor grad_rows, Tensor logits, Tensor stats, Tensor slice_idx, float z_loss, "
      "float softcap) -> Tensor");
  // Knowledge distillation (the teacher's logits as the target): distill.ops.DISTILL_SCHEMA
  // (cpu/ops_cpu_distill.cpp, cuda/ops_cuda_distill.cu).
  m.def(
      "ext_distill(Tensor student, Tensor teacher, Tensor row_scale, float temperature, int divergence, "
      "float jsd_beta, Tensor(a!)? grad, bool accumulate) -> Tensor");
}

namespace {

// fusedloss._C.cpu_capability(): the vector kernels this process runs
// ("AVX512", "AVX2" or "DEFAULT"), for tests and benchmark reports.
PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fusedloss::cpu::kernels_for_this_cpu().capability);
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU kernels in use: AVX512, AVX2 or DEFAULT (ATEN_CPU_CAPABILITY lowers it)."},
    {"_set_ext_fwd_backward", fusedloss::set_python_backward, METH_O,
     "The Python backward formula of ext_fwd's C++ Autograd kernel for the non-eager cases (autograd.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
