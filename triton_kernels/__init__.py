"""Triton kernels for fusedloss (packaged as ``fusedloss.triton_kernels``)."""
