"""synapo_ext: SynAPO (VAPO + HVM + SCVL + EA-GAE) for verl and TRL.

`synapo_ext.core` is the host-free math; `synapo_ext.verl` and `synapo_ext.trl` are the adapters.
"""

__version__ = "0.1.0.dev0"
