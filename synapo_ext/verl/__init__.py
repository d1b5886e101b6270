"""SynAPO for verl 0.9.1: the `synapo` advantage estimator, its two-head critic and critic losses.

Loaded as a verl plugin (`verl.plugins` entry point -> `synapo_ext.patches.verl_plugin`), so after
`pip install "synapo-ext[verl]"` the stock trainer runs it:

    python -m verl.trainer.main_ppo ... algorithm.adv_estimator=synapo +algorithm.synapo.preset=vapo

Importing this package or its modules changes nothing in verl; `synapo_ext.patches.verl_plugin` (or
`synapo_ext.patches.verl.apply_synapo_to_verl()`) installs it. Where entry points are off, set
`VERL_USE_EXTERNAL_MODULES=synapo_ext.patches.verl_plugin`. Parameters live under `+algorithm.synapo.*` (see
`synapo_ext.core.SynAPOParams`); `synapo_ext.patches.verl` lists every patch.
"""
