"""Triton kernels, imported as ``restorenet_kernels``: one op per file, each
holding its kernels and the Python launchers the op's autograd wrapper calls.

Importing a kernel module needs triton; ``restorenet.ops`` imports them lazily,
only when the ``triton`` backend is picked.
"""
