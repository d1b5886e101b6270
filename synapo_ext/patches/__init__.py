"""Explicit, reversible patches of host libraries.

`synapo_ext.patches.verl`: the verl patch table, `apply_synapo_to_verl()` / `revert_synapo_to_verl()` and the version
policy (`check_verl_patches`); `synapo_ext.patches.verl_plugin`: the `verl.plugins` entry point that applies it.
Layering: patches -> adapters (`synapo_ext.verl`) -> core; nothing below imports the patches.
"""
