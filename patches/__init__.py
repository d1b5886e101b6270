"""Explicit, reversible patches of host libraries (shipped as `synapo_ext.patches`).

`synapo_ext.patches.verl`: `apply_synapo_to_verl()` / `revert_synapo_to_verl()` for verl 0.9.1.
"""
