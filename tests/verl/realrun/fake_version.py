"""Test-only: make verl look like another release, loaded before the plugin with
`VERL_USE_EXTERNAL_MODULES=tests.verl.realrun.fake_version` (verl loads external modules before its plugins).

    SYNAPO_TEST_VERL_VERSION=0.10.0.dev0        `verl.__version__` reads this version
    SYNAPO_TEST_RENAME=<module>:<attribute>     that attribute (`name` or `Class.name`) is renamed `<name>_renamed`
                                                right after its module is imported, before the plugin's patch
"""

from __future__ import annotations

import os
import sys

from synapo_ext.patches._hooks import when_imported


def _rename(target: str) -> None:
    module_name, _, attribute = target.partition(":")
    *path, name = attribute.split(".")

    def rename(module) -> None:
        owner = module
        for piece in path:
            owner = getattr(owner, piece)
        setattr(owner, f"{name}_renamed", getattr(owner, name))
        delattr(owner, name)

    rename.__module__ = __name__
    when_imported(module_name, rename)


if os.environ.get("SYNAPO_TEST_VERL_VERSION"):
    sys.modules["verl"].__version__ = os.environ["SYNAPO_TEST_VERL_VERSION"]
if os.environ.get("SYNAPO_TEST_RENAME"):
    _rename(os.environ["SYNAPO_TEST_RENAME"])
