"""Exact attention kernels. Each fast path is tested against :mod:`posbias.kernels.reference`.

Kernels receive already-rotated q/k, resolved positions and the scale (see
:func:`posbias.attention.attention`); they never import a specific scheme class, only the
contract in :mod:`posbias.schemes.base`.
"""
