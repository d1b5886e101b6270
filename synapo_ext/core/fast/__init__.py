"""The speed wing of the core: the advantage stage fused into one compiled pass per row on the CPU (numba).

`compute_synapo_advantages` (core/stage.py) is its only caller and makes the one choice, fused or torch
(`synapo_ext.core.backend.fused_kernels`); every formula's readable version is the torch function in `synapo_ext.core`,
and the fused stage is tested against the torch stage. `stage.py` checks inputs and allocates outputs; `kernels.py`
(imported only when the fused stage runs) holds the kernels and the row-block threads that run them.
"""
