"""BatchNorm folding: fold each BatchNorm into the conv before it, in a copy of the model."""

from __future__ import annotations

import copy
import warnings

from torch import nn


def _fold_sequential_pairs(model: nn.Module) -> int:
    """Fold Conv2d -> BatchNorm2d pairs that follow each other inside nn.Sequential."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d:
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
                folded += 1
    return folded


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with each BatchNorm folded into the conv before it.

    Adjacent pairs inside nn.Sequential are folded in place (the module tree, and its
    speed, stay as they were); any BatchNorm left (ResNet's, MobileNet's) is found on the
    torch.fx graph. Models fx cannot trace keep those BatchNorms in float, with a warning.
    """
    model = copy.deepcopy(model).eval()
    _fold_sequential_pairs(model)
    if not _has_batchnorm(model):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fuse(model, inplace=True)
    except Exception:  # untraceable control flow
        warnings.warn("logquant: some BatchNorm layers could not be folded (model not "
                      "traceable by torch.fx); they stay in float", stacklevel=2)
        return model
