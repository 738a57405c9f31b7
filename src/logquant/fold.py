"""BatchNorm folding: fold each BatchNorm into the conv before it, in a copy of the model."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from logquant.nn import layer_kind

# (layer, BatchNorm) pairs folded: exact types, as torch.fx.experimental.optimization.fuse
# does. A subclass may transform its weight (weight standardization) or a BatchNorm
# subclass do more than normalize (timm's BatchNormAct2d): folding those would be wrong.
FOLD_PAIRS = {
    (nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
}


def _fold_sequential_pairs(model: nn.Module) -> int:
    """Fold Conv2d -> BatchNorm2d pairs that follow each other inside nn.Sequential."""
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


class _LayerTracer(fx.Tracer):
    """Keeps every conv/linear layer a leaf of the graph, whatever module defines it (timm's
    Linear, Conv2dSame, StdConv2d): traced through, it would be seen as bare parameters."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return layer_kind(m) is not None or super().is_leaf_module(m, qualname)


def _fold_traced_pairs(model: nn.Module, graph: fx.Graph) -> int:
    """Fold each layer -> BatchNorm pair of the model's fx graph, in the module tree itself.

    The graph only tells which pairs to fold: a pair qualifies when each of the two modules
    is called once, the layer's output feeds the BatchNorm alone, and no code reads their
    parameters directly. The layer becomes the folded layer and the BatchNorm nn.Identity,
    so the model keeps its class, methods, forward code and every other module (a
    GraphModule would drop unused modules, and inline layers it traces through).
    """
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    read = [str(n.target) for n in graph.nodes if n.op == "get_attr"]

    def only_called(name: str) -> bool:
        return calls[name] == 1 and not any(r.startswith(name + ".") for r in read)

    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        layer_node = node.args[0]
        if not isinstance(layer_node, fx.Node) or layer_node.op != "call_module":
            continue
        layer, bn = modules[layer_node.target], modules[node.target]
        if (type(layer), type(bn)) not in FOLD_PAIRS or not bn.track_running_stats \
                or len(layer_node.users) != 1 or not only_called(layer_node.target) \
                or not only_called(node.target):
            continue
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        if isinstance(layer, nn.Linear) and bn.num_features != layer.out_features:
            continue
        model.set_submodule(layer_node.target, fuse(layer, bn))
        model.set_submodule(node.target, nn.Identity())
        folded += 1
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with each BatchNorm folded into the conv before it.

    Adjacent pairs inside nn.Sequential are folded directly; any BatchNorm left (ResNet's,
    MobileNet's) is paired with its layer on the torch.fx graph (conv/linear layers are
    leaves there) and folded in the module tree. Models fx cannot trace keep those
    BatchNorms in float, with a warning. The module tree, names and class stay as they were.
    """
    model = copy.deepcopy(model).eval()
    _fold_sequential_pairs(model)
    if not _has_batchnorm(model):
        return model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _LayerTracer().trace(model)
    except Exception:  # untraceable control flow
        warnings.warn("logquant: some BatchNorm layers could not be folded (model not "
                      "traceable by torch.fx); they stay in float", stacklevel=2)
        return model
    _fold_traced_pairs(model, graph)
    return model
