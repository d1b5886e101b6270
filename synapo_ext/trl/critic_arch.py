"""The critic's architecture for any causal-LM policy, the policy's base weights under PEFT, and a LoRA critic.

- `critic_class`: transformers' `*ForTokenClassification` class for the policy's config, or, where the model type has
  none (Gemma3-text, OLMo2, Granite, Cohere2, ...), a value head on the backbone `AutoModel` builds (transformers'
  `GenericForTokenClassification` over the model's own `*PreTrainedModel`: the backbone's parameter names are the
  causal LM's, so the critic loads the policy's weights as a token classifier would).
- `base_model_state_dict` / `base_parameter_name`: a PEFT policy's weights under the plain model's names (adapter
  tensors left out, `base_layer` unwrapped), what a critic initialised from the policy copies.
- `wrap_critic_lora`: the critic wrapped by PEFT (a LoRA critic: frozen backbone, trained adapters and value head).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from transformers import AutoModel, AutoModelForTokenClassification, PretrainedConfig, PreTrainedModel

__all__ = [
    "HEAD_NAMES",
    "base_model_state_dict",
    "base_parameter_name",
    "critic_class",
    "head_name",
    "is_peft_model",
    "wrap_critic_lora",
]

HEAD_NAMES = ("score", "classifier")  # the value head's module name in transformers' token classifiers


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel` (False when peft is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def critic_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The token-classification class for `config`: transformers' own, else a value head on `AutoModel`'s backbone.

    Raises:
        ValueError: `AutoModel` has no class for `config` either (naming `critic_model`: pass a critic).
    """
    try:
        return AutoModelForTokenClassification._model_mapping[type(config)]
    except KeyError:
        pass
    try:
        backbone = AutoModel._model_mapping[type(config)]
    except KeyError:
        raise ValueError(
            f"no critic can be built for a policy of model type {config.model_type!r}: transformers has neither a "
            "token-classification class nor an AutoModel backbone for it; pass `critic_model=` (a model whose "
            "forward returns `.logits` of shape (B, L, num_labels) and whose config has `num_labels`)"
        ) from None
    return _value_head_class(backbone)


@functools.cache
def _value_head_class(backbone: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """`<Model>ValueModel`: transformers' `GenericForTokenClassification` on `backbone`'s `*PreTrainedModel`."""
    from transformers.modeling_layers import GenericForTokenClassification

    pretrained = next(
        cls
        for cls in backbone.__mro__
        if issubclass(cls, PreTrainedModel) and cls is not PreTrainedModel and cls.__name__.endswith("PreTrainedModel")
    )
    name = pretrained.__name__.removesuffix("PreTrainedModel") + "ValueModel"
    # transformers inspects the class's module source to decide which attention / experts kernels it may set
    namespace = {"base_model_prefix": pretrained.base_model_prefix or "model", "__module__": pretrained.__module__}
    return type(name, (GenericForTokenClassification, pretrained), namespace)


def base_parameter_name(name: str, tuner_prefix: str) -> str | None:
    """A PEFT model's parameter / buffer name as the plain model names it; None for the adapter's own tensors.

    `base_model.model.model.layers.0.q_proj.base_layer.weight` -> `model.layers.0.q_proj.weight`;
    `...q_proj.lora_A.default.weight` (with `tuner_prefix` "lora_") and `...modules_to_save.default.weight` -> None;
    `...original_module.weight` (the frozen copy of a module PEFT trains whole) -> the module's plain name.
    """
    name = name.removeprefix("base_model.model.")
    parts = name.split(".")
    if any(p.startswith(tuner_prefix) for p in parts) or "modules_to_save" in parts:
        return None
    return ".".join(p for p in parts if p not in ("base_layer", "original_module"))


def base_model_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's state dict under the plain model's names: a PEFT policy's base weights (adapters left out, so
    the weights the adapters start from, a LoRA policy's model before training), else `policy.state_dict()`."""
    if not is_peft_model(policy):
        return policy.state_dict()
    prefix = getattr(policy.base_model, "prefix", "lora_")
    out = {}
    for name, tensor in policy.state_dict().items():
        plain = base_parameter_name(name, prefix)
        if plain is not None:
            out[plain] = tensor
    return out


def head_name(critic: nn.Module) -> str | None:
    """The name of the critic's value head module (`score` or `classifier`), None if it has neither."""
    return next((name for name in HEAD_NAMES if isinstance(getattr(critic, name, None), nn.Module)), None)


def wrap_critic_lora(critic: PreTrainedModel, peft_config) -> nn.Module:
    """`critic` wrapped by PEFT with `peft_config` (e.g. a `peft.LoraConfig`); the value head is trained whole
    (added to `modules_to_save`), the backbone is frozen apart from the adapters.

    Raises:
        ImportError: peft is not installed.
        TypeError: `peft_config` is not a `peft.PeftConfig`.
    """
    try:
        from peft import PeftConfig, get_peft_model
    except ImportError as err:
        raise ImportError("`critic_peft_config` needs peft: pip install peft") from err
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"`critic_peft_config` must be a peft.PeftConfig (e.g. LoraConfig), got {type(peft_config)}")
    config = copy.deepcopy(peft_config)
    head = head_name(critic)
    if head is not None:
        config.modules_to_save = sorted({*(config.modules_to_save or []), head})
    return get_peft_model(critic, config)
