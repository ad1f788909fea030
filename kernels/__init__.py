"""Triton kernels of dyqvla_ros, each beside its exact PyTorch reference.

Installed as ``dyqvla_ros.kernels``. Importing this package does not require a GPU;
launching a kernel without one requires ``TRITON_INTERPRET=1``.
"""
