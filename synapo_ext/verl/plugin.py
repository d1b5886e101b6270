"""The plugin's former name, kept for `VERL_USE_EXTERNAL_MODULES=synapo_ext.verl.plugin` and for installs whose
`verl.plugins` entry point still names it: importing it imports `synapo_ext.patches.verl_plugin`."""

import synapo_ext.patches.verl_plugin  # noqa: F401
