"""SynAPO for verl 0.9.1: the `synapo` advantage estimator, its two-head critic and critic losses.

Loaded as a verl plugin (`verl.plugins` entry point -> `synapo_ext.verl.plugin`), so after
`pip install "synapo-ext[verl]"` the stock trainer runs it:

    python -m verl.trainer.main_ppo ... algorithm.adv_estimator=synapo +algorithm.synapo.preset=vapo

Importing `synapo_ext.verl` installs it too (for `VERL_USE_EXTERNAL_MODULES=synapo_ext.verl`). Parameters live under
`+algorithm.synapo.*` (see `synapo_ext.core.SynAPOParams`); `synapo_ext.patches.verl` lists every patch.
"""

from . import plugin

__all__ = ["plugin"]
