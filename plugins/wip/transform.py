"""The model transform ``wip_attention``: :func:`.attention.swap_attention` with the configured operator, and
the optional first-batch calibration of :mod:`.recovery`.

It sits above both modules (recovery imports attention for the layers it fits), so that attention never
imports recovery back.
"""
from __future__ import annotations

from torch import nn

from .attention import swap_attention
from .operators import check_mixer, get_operator


class WipAttentionTransform:
    """Model transform ``wip_attention``: :func:`swap_attention` with the configured operator.

    With ``calibrate`` the swapped model also gets a one-shot closed-form calibration on the run's own first
    ``calibrate_batches`` training batches, done inside the first training forward(s)
    (:class:`plait.plugins.wip.recovery.FirstBatchCalibration`, kept as ``model.wip_calibration``).
    """

    def __init__(self, operator: str, mixer: str, key_bias: bool, dim_scales: bool, calibrate: bool = False,
                 calibrate_batches: int = 1):
        get_operator(operator)
        check_mixer(mixer)
        if calibrate_batches < 1:
            raise ValueError(f"calibrate_batches must be at least 1, got {calibrate_batches}")
        self.operator, self.mixer, self.key_bias, self.dim_scales = operator, mixer, key_bias, dim_scales
        self.calibrate, self.calibrate_batches = bool(calibrate), int(calibrate_batches)

    def __call__(self, model: nn.Module) -> nn.Module:
        model = swap_attention(model, self.operator, self.mixer, self.key_bias, self.dim_scales)
        if self.calibrate:
            from .recovery import FirstBatchCalibration

            hook = FirstBatchCalibration(self.calibrate_batches)
            model.register_forward_pre_hook(hook, with_kwargs=True)
            model.wip_calibration = hook  # a plain attribute (not a module, not in the state dict)
        return model
