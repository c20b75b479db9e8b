// The C++ Autograd kernel of fusedloss::ext_fwd (autograd.cpp).
#pragma once

#include <Python.h>

namespace fusedloss {

// fusedloss._C._set_ext_fwd_backward(fn): the Python formula the C++ backward calls for every
// backward that is not the plain eager first-order step (ops.one_target_backward's arguments:
// grad_loss, logits, target, weight, saved, fused, then the op's nine scalars).
PyObject* set_python_backward(PyObject* self, PyObject* fn);

}  // namespace fusedloss
