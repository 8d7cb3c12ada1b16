"""Activations and weight-initialisation schemes shared by the demo models."""

from __future__ import annotations

from typing import Final, Literal

import torch
from torch import Tensor, nn

from ..core._validation import check_choice, check_number

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "TOO_LARGE_STD",
    "ActivationName",
    "InitName",
    "SteepLeakyReLU",
    "init_weights",
    "make_activation",
]

ActivationName = Literal["relu", "tanh", "steep"]
"""Activation names accepted by the feed-forward demo models."""

ACTIVATIONS: Final[tuple[ActivationName, ...]] = ("relu", "tanh", "steep")
"""All values of :data:`ActivationName`."""

InitName = Literal["default", "xavier", "he", "too_large"]
"""Weight-initialisation scheme names accepted by all demo models."""

INITS: Final[tuple[InitName, ...]] = ("default", "xavier", "he", "too_large")
"""All values of :data:`InitName`."""

TOO_LARGE_STD: Final[float] = 1.0
"""Weight standard deviation of the ``"too_large"`` scheme, whatever the fan-in.

He init would use ``sqrt(2 / fan_in)`` (0.18 for a width of 64), so every layer amplifies
activations and gradients by roughly ``sqrt(fan_in / 2)``.
"""


class SteepLeakyReLU(nn.Module):
    """``gain * leaky_relu(x, negative_slope)``: a ReLU-like activation with derivative ``gain``.

    With the default ``gain=2.0`` the derivative is 2 for ``x > 0`` (0.2 below zero), about
    ``sqrt(2)`` times more than ReLU in RMS, so each layer multiplies activations and
    back-propagated gradients by an extra factor that compounds with depth.

    Args:
        gain: Slope for positive inputs, ``> 0``.
        negative_slope: Slope for negative inputs relative to ``gain``, ``> 0``.

    Example:
        >>> SteepLeakyReLU()(torch.tensor([-1.0, 0.0, 1.5]))
        tensor([-0.2000,  0.0000,  3.0000])
    """

    def __init__(self, gain: float = 2.0, negative_slope: float = 0.1) -> None:
        super().__init__()
        self.gain = check_number("gain", gain, low=0, low_inclusive=False)
        self.negative_slope = check_number("negative_slope", negative_slope, low=0,
                                           low_inclusive=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the activation elementwise."""
        return self.gain * nn.functional.leaky_relu(x, self.negative_slope)

    def extra_repr(self) -> str:
        """Show the hyperparameters in ``repr``."""
        return f"gain={self.gain}, negative_slope={self.negative_slope}"


def make_activation(name: ActivationName) -> nn.Module:
    """Build an activation module by name.

    Args:
        name: ``"relu"``, ``"tanh"`` or ``"steep"`` (:class:`SteepLeakyReLU`, derivative 2).

    Returns:
        A fresh activation module.

    Raises:
        ValueError: If ``name`` is unknown.

    Example:
        >>> make_activation("tanh")
        Tanh()
    """
    check_choice("activation", name, ACTIVATIONS)
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    return SteepLeakyReLU()


def _init_matrix(weight: Tensor, scheme: InitName) -> None:
    if scheme == "xavier":
        nn.init.xavier_normal_(weight)
    elif scheme == "he":
        nn.init.kaiming_normal_(weight, nonlinearity="relu")
    elif scheme == "too_large":
        nn.init.normal_(weight, mean=0.0, std=TOO_LARGE_STD)


@torch.no_grad()
def init_weights(module: nn.Module, scheme: InitName) -> None:
    """Re-initialise every ``nn.Linear`` and ``nn.RNNBase`` inside ``module`` in place.

    Weight matrices follow ``scheme`` and biases are zeroed; ``"default"`` keeps PyTorch's own
    initialisation untouched. Other layers (e.g. BatchNorm) are never modified.

    Args:
        module: Root module; all submodules are visited.
        scheme: ``"default"`` (PyTorch's init), ``"xavier"`` (Glorot normal), ``"he"``
            (Kaiming normal for ReLU) or ``"too_large"`` (normal with std
            :data:`TOO_LARGE_STD`, far too large for any fan-in above a few units).

    Raises:
        ValueError: If ``scheme`` is unknown.

    Example:
        >>> layer = nn.Linear(64, 64)
        >>> init_weights(layer, "too_large")
        >>> bool(layer.weight.std() > 0.5), bool(layer.bias.abs().sum() == 0)
        (True, True)
    """
    check_choice("init", scheme, INITS)
    if scheme == "default":
        return
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            _init_matrix(sub.weight, scheme)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.RNNBase):
            for name, param in sub.named_parameters():
                if name.startswith("weight"):
                    _init_matrix(param, scheme)
                elif name.startswith("bias"):
                    nn.init.zeros_(param)
