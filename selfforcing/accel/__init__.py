"""Opt-in accelerators: code that runs parts of the model faster on some hardware, outside the model.

The model (:mod:`selfforcing.models.wan`) is plain PyTorch. It offers its forwards to an accelerator through one hook
(:mod:`selfforcing.models.wan.runtime`); an accelerator computes the same function to float rounding, or declines.
``cpu``: the C++ blocks and the timed choice of the FFN kernel for float32 CPU streaming.
"""
