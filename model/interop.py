"""Moving weights to and from ``transformers.MambaModel`` (the reference implementation).

Our ``Backbone`` has exactly ``MambaModel``'s parameter names and shapes, so the state
dict moves both ways unchanged; this module builds the matching ``MambaConfig``.
``transformers`` is a development dependency, imported only when these are called.
"""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.network import EHRMamba


def transformers_config(config: ModelConfig) -> Any:
    """The ``MambaConfig`` with our architecture (no cache: we manage state ourselves)."""
    from transformers import MambaConfig

    return MambaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        state_size=config.state_size,
        num_hidden_layers=config.num_hidden_layers,
        conv_kernel=config.conv_kernel,
        expand=config.expand,
        time_step_rank=config.dt_rank,
        layer_norm_epsilon=config.layer_norm_epsilon,
        use_bias=config.use_bias,
        use_conv_bias=config.use_conv_bias,
        hidden_act="silu",
        residual_in_fp32=True,
        use_cache=False,
    )


def to_transformers(model: EHRMamba) -> Any:
    """A ``transformers.MambaModel`` (eval mode) holding our backbone's weights."""
    from transformers import MambaModel

    reference = MambaModel(transformers_config(model.config))
    reference.load_state_dict(model.backbone.state_dict(), strict=True)
    reference.train(False)
    return reference
