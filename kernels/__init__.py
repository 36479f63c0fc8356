"""Triton kernels of medmtl, one module per op (installed as medmtl.kernels).

Each module holds the @triton.jit kernels, their launchers and the list of
kernels compiled ahead of time by the tests. Importing a module imports triton.
"""
