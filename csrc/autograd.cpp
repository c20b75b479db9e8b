// The Autograd kernel of fusedloss::ext_fwd (the cpu and cuda backends' one-target op), in C++
// as torchvision registers its ops' autograd: the eager step pays no Python for autograd.
//
// Forward: below the Autograd key the op itself; when a gradient is wanted, a
// torch::autograd::Function that saves what ops.register_autograd's setup_context saves
// (the logits, the target, the weight, and the fused gradient or the row stats).
//
// Backward, in C++ when it is the plain first-order step (grad mode off, no torch.func
// transform, no Python dispatch mode, no wrapped tensor: fake, functional, batched):
//   fused gradient: the forward's buffer itself when grad_output is 1 on CPU (one number read
//     from host memory), else grad * grad_output, as ops.scale_fused_grad_reusing;
//   otherwise:      fusedloss::ext_bwd from the stats.
// Every other backward (create_graph=True, vmap over the backward, torch.compile's tracing of
// it) calls the Python formula that _cpp_backend registers (ops.one_target_backward): the
// composite path of docs/autograd.md, unchanged.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "autograd.h"

namespace fusedloss {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using FwdOut = std::tuple<Tensor, Tensor, Tensor>;

// The Python backward formula (set once at import by _cpp_backend; a strong reference kept).
PyObject* g_python_backward = nullptr;

const auto& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedloss::ext_fwd", "")
          .typed<FwdOut(const Tensor&, const Tensor&, const std::optional<Tensor>&, int64_t, int64_t, int64_t,
                        double, double, double, double, double, double, bool)>();
  return op;
}

const auto& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedloss::ext_bwd", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                        int64_t, int64_t, int64_t, double, double, double, double, double, double)>();
  return op;
}

// torch._C._are_functorch_transforms_active()
bool transforms_active() {
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// A tensor the C++ backward may read and multiply: no Python subclass (fake, functional), no
// functionalization or vmap wrapper (legacy or torch.func).
bool plain(const Tensor& t) {
  constexpr c10::DispatchKeySet wrapped = c10::python_ks | c10::functorch_transforms_ks |
                                          c10::DispatchKeySet(c10::DispatchKey::Functionalize);
  return !t.defined() || !t.key_set().has_any(wrapped);
}

// ops.scale_fused_grad_reusing, for plain tensors in eager mode.
Tensor scale_fused_grad(const Tensor& grad, const Tensor& grad_loss) {
  if (grad.device().is_cpu()) {  // a memory read, not a device synchronization
    if (grad_loss.dim() == 0 && !grad_loss.requires_grad()) {
      if (grad_loss.item<double>() == 1.0) return grad;
    } else if (at::all(grad_loss == 1).item<bool>()) {
      return grad;
    }
  }
  const Tensor scale = grad_loss.dim() == 0 ? grad_loss : grad_loss.unsqueeze(1);
  return (grad * scale).to(grad.scalar_type());
}

[[noreturn]] void throw_python_error() {
  python_error err;
  err.persist();
  throw err;
}

struct GilState {
  PyGILState_STATE state = PyGILState_Ensure();
  ~GilState() { PyGILState_Release(state); }
};

PyObject* wrap(const Tensor& t) {
  if (!t.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(t);
}

// The Python formula: (grad_loss, logits, target, weight, saved, fused, *scalars) -> grad_logits.
Tensor python_backward(const Tensor& grad_loss, const variable_list& saved, bool fused, const c10::List<int64_t>& ints,
                       const c10::List<double>& floats) {
  TORCH_CHECK(g_python_backward != nullptr, "fusedloss: the backward formula of ext_fwd was not registered "
              "(import fusedloss._cpp_backend)");
  GilState gil;
  PyObject* args = PyTuple_New(15);
  if (args == nullptr) throw_python_error();
  int i = 0;
  PyTuple_SET_ITEM(args, i++, wrap(grad_loss));
  for (const Tensor& t : saved) PyTuple_SET_ITEM(args, i++, wrap(t));
  PyTuple_SET_ITEM(args, i++, PyBool_FromLong(fused));
  for (int k = 0; k < 3; ++k) PyTuple_SET_ITEM(args, i++, PyLong_FromLongLong(ints.get(k)));
  for (int k = 0; k < 6; ++k) PyTuple_SET_ITEM(args, i++, PyFloat_FromDouble(floats.get(k)));
  PyObject* result = PyObject_CallObject(g_python_backward, args);
  Py_DECREF(args);
  if (result == nullptr) throw_python_error();
  Tensor out;
  if (result != Py_None) {
    if (!THPVariable_Check(result)) {
      Py_DECREF(result);
      TORCH_CHECK(false, "fusedloss: the backward formula of ext_fwd returned a non-tensor");
    }
    out = THPVariable_Unpack(result);
  }
  Py_DECREF(result);
  return out;
}

struct ExtFwdFunction : public torch::autograd::Function<ExtFwdFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& target,
                               const std::optional<Tensor>& weight, int64_t variant, int64_t reduction,
                               int64_t ignore_index, double label_smoothing, double alpha, double beta, double gamma,
                               double z_loss, double softcap, bool compute_grad) {
    Tensor loss, stats, grad;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(loss, stats, grad) = fwd_op().call(logits, target, weight, variant, reduction, ignore_index,
                                                  label_smoothing, alpha, beta, gamma, z_loss, softcap, compute_grad);
    }
    ctx->saved_data["i"] = c10::List<int64_t>({variant, reduction, ignore_index, int64_t(compute_grad)});
    ctx->saved_data["f"] = c10::List<double>({label_smoothing, alpha, beta, gamma, z_loss, softcap});
    ctx->mark_non_differentiable({stats, grad});
    // stats and grad never receive a gradient: no (N, C) zeros materialized for them.
    ctx->set_materialize_grads(false);
    // The logits are saved with the fused gradient too: a double backward differentiates
    // the gradient through them (docs/autograd.md).
    ctx->save_for_backward({logits, target, weight.has_value() ? *weight : Tensor(), compute_grad ? grad : stats});
    return {loss, stats, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(13);
    const Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return out;  // the loss itself got no gradient
    const variable_list saved = ctx->get_saved_variables();
    const auto ints = ctx->saved_data["i"].toIntList();
    const auto floats = ctx->saved_data["f"].toDoubleList();
    const bool fused = ints.get(3) != 0;
    const bool eager_first_order = !at::GradMode::is_enabled() && !transforms_active() &&
                                   c10::impl::TorchDispatchModeTLS::stack_len() == 0 && plain(grad_loss) &&
                                   plain(saved[0]) && plain(saved[3]);
    if (!eager_first_order) {
      out[0] = python_backward(grad_loss, saved, fused, ints, floats);
    } else if (fused) {
      out[0] = scale_fused_grad(saved[3], grad_loss);
    } else {
      const std::optional<Tensor> weight = saved[2].defined() ? std::optional<Tensor>(saved[2]) : std::nullopt;
      out[0] = bwd_op().call(grad_loss, saved[0], saved[1], weight, saved[3], ints.get(0), ints.get(1), ints.get(2),
                             floats.get(0), floats.get(1), floats.get(2), floats.get(3), floats.get(4), floats.get(5));
    }
    return out;
  }
};

FwdOut ext_fwd_autograd(const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
                        int64_t variant, int64_t reduction, int64_t ignore_index, double label_smoothing, double alpha,
                        double beta, double gamma, double z_loss, double softcap, bool compute_grad) {
  // Every call passes here before a backend is chosen: with a tensor on another device the
  // dispatcher would pick that device's kernel (a meta weight: the fake one, no error).
  TORCH_CHECK(target.device() == logits.device(), "fusedloss::ext_fwd: target is on ", target.device(),
              " but logits are on ", logits.device());
  TORCH_CHECK(!weight.has_value() || weight->device() == logits.device(), "fusedloss::ext_fwd: weight is on ",
              weight.has_value() ? weight->device() : logits.device(), " but logits are on ", logits.device());
  const bool wants_grad = at::GradMode::is_enabled() &&
                          (logits.requires_grad() || (weight.has_value() && weight->requires_grad()));
  if (!wants_grad) {  // nothing to record: no Node, no saved tensors
    at::AutoDispatchBelowADInplaceOrView below;
    return fwd_op().call(logits, target, weight, variant, reduction, ignore_index, label_smoothing, alpha, beta,
                         gamma, z_loss, softcap, compute_grad);
  }
  variable_list out = ExtFwdFunction::apply(logits, target, weight, variant, reduction, ignore_index, label_smoothing,
                                            alpha, beta, gamma, z_loss, softcap, compute_grad);
  return {out[0], out[1], out[2]};
}

}  // namespace

PyObject* set_python_backward(PyObject*, PyObject* fn) {
  if (!PyCallable_Check(fn)) {
    PyErr_SetString(PyExc_TypeError, "fusedloss._C._set_ext_fwd_backward expects a callable");
    return nullptr;
  }
  Py_INCREF(fn);
  PyObject* old = g_python_backward;
  g_python_backward = fn;
  Py_XDECREF(old);
  Py_RETURN_NONE;
}

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) { m.impl("ext_fwd", &ext_fwd_autograd); }

}  // namespace fusedloss
