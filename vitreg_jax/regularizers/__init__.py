"""Attention regularizers: head diversity (DIV) and ARViT's attention-map penalties.

Three regularizers from two papers, as pure functions that return a scalar, one file per
paper, each exporting its spec; a registry of the specs; and the training wrapper that wires
them into the loss from `config.regularizers`:

* `registry.py`: `RegularizerSpec` (name, options, choices, default layers, what it needs
  from the forward pass, its per-block function, the balance check's verdict), `register`,
  `get`, `REGISTRY`. A user registers a spec from outside the package and names it in a
  config (docs/regularizers.md, "Adding a regularizer").
* `div.py`: DIV, the head-diversity poster's orthogonality of per-head input gradients
  (`div_loss`, `div_head_input_grads`, `prediction_target`; spec `div.SPEC`).
* `attention_maps.py`: ARViT's spatial distance (section 3.2) and patch similarity (3.3)
  penalties (`distance_loss`, `similarity_loss` and their matrices; specs
  `attention_maps.DISTANCE`, `attention_maps.SIMILARITY`).
* `wrapper.py`: `build(config.regularizers, model)` -> a `Regularizer` whose call returns
  the logits, the weighted total and each term; it reads only the specs, never a name.

Where the papers and the authors' public code differ, the paper's definition is the default
and the code's variant an option; each docstring says which is which.

Training usage (see docs/design.md)::

    reg = regularizers.build(config.regularizers, model)
    logits, out, reg_total, terms, new_state = reg(variables, images, labels=labels,
                                                   train=True, rngs={'dropout': key})
    loss = cross_entropy(logits, labels) + reg_total
"""

from vitreg_jax.regularizers.registry import (ATTENTION, HEAD_INPUT_GRADS, NEEDS, REGISTRY,
                                              LayerContext, RegularizerSpec, get, register)
from vitreg_jax.regularizers.attention_maps import (BATCH_REDUCTIONS, PENALTY_KINDS,
                                                    SIMILARITY_METRICS, attention_map_loss,
                                                    distance_loss, distance_penalty_matrix,
                                                    manhattan_distance_matrix,
                                                    patch_gram_matrices, similarity_loss,
                                                    similarity_matrix)
from vitreg_jax.regularizers.div import (DIV_REDUCTIONS, DIV_TARGETS, div_head_input_grads,
                                         div_loss, prediction_target)
from vitreg_jax.regularizers.wrapper import (REGULARIZERS, Regularizer, build,
                                             check_attention_model, check_config,
                                             is_attention_model)

__all__ = [
    'ATTENTION', 'BATCH_REDUCTIONS', 'DIV_REDUCTIONS', 'DIV_TARGETS', 'HEAD_INPUT_GRADS',
    'NEEDS', 'PENALTY_KINDS', 'REGISTRY', 'REGULARIZERS', 'SIMILARITY_METRICS',
    'LayerContext', 'Regularizer', 'RegularizerSpec', 'attention_map_loss', 'build',
    'check_attention_model', 'check_config', 'distance_loss', 'distance_penalty_matrix',
    'div_head_input_grads', 'div_loss', 'get', 'is_attention_model',
    'manhattan_distance_matrix', 'patch_gram_matrices', 'prediction_target', 'register',
    'similarity_loss', 'similarity_matrix',
]
