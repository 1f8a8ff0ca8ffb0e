"""Fast paths that keep the numbers: BatchNorm folding for the attack, and the optional device
settings.

Chapter 9 introduces them. The attack runs its models in eval mode, where a BatchNorm layer is a
fixed per-channel affine map: `fold_batchnorm` merges it into the convolution (or linear layer)
before it, which gives the same function with fewer passes over the activations (exact up to float
rounding). `attack_model(model)` is what an attack calls: the folded copy, refreshed from the
model's current weights, when folding is switched on (`options(fold_batchnorm=True)` or
`configure(...)`), else the model.

The other fast paths change only speed and, for bf16, rounding; every one is off by default on a
CPU: `prepare_model` (channels_last memory format, `torch.compile`), `autocast` (bfloat16 autocast),
`configure_backend` (cudnn.benchmark on a GPU). `FastOptions.for_device("cuda")` switches them on.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from . import validate

__all__ = [
    "FastOptions",
    "attack_model",
    "autocast",
    "configure",
    "configure_backend",
    "count_batchnorm",
    "current",
    "fold_batchnorm",
    "folding",
    "no_grad",
    "options",
    "prepare_model",
]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class FastOptions:
    """Which fast paths are on. All off is the library default (bit for bit the reference numbers).

    fold_batchnorm: the attack's eval-mode passes use a BatchNorm-folded copy of each model.
    inference_mode: gradient-free passes (the attack's reference, evaluation) use
    `torch.inference_mode`. channels_last / compile / bf16: memory format, `torch.compile`, bfloat16
    autocast (see `prepare_model`, `autocast`); cudnn_benchmark: let cuDNN pick the fastest
    convolution algorithm (GPU).
    """
    fold_batchnorm: bool = False
    inference_mode: bool = False
    channels_last: bool = False
    compile: bool = False
    bf16: bool = False
    cudnn_benchmark: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            validate.flag(f.name, getattr(self, f.name))

    @classmethod
    def for_device(cls, device: str | torch.device) -> FastOptions:
        """The recommended options: on a GPU every fast path; on a CPU folding and inference mode
        only (channels_last, compile and bf16 are slower or unsupported on most CPUs)."""
        kind = torch.device(device).type
        if kind == "cuda":
            return cls(True, True, True, True, True, True)
        return cls(fold_batchnorm=True, inference_mode=True)


_current = FastOptions()


def current() -> FastOptions:
    """The options in force now."""
    return _current


def configure(**changes) -> FastOptions:
    """Change the options for the rest of the process (names as `FastOptions`); returns the new
    options."""
    global _current
    allowed = [f.name for f in dataclasses.fields(FastOptions)]
    unknown = sorted(set(changes) - set(allowed))
    if unknown:
        raise ValueError(f"unknown fast option {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    _current = dataclasses.replace(_current, **changes)
    return _current


@contextlib.contextmanager
def options(**changes):
    """Within the block, the options changed as `configure` does; restored on exit."""
    global _current
    saved = _current
    try:
        yield configure(**changes)
    finally:
        _current = saved


def folding(enabled: bool):
    """A block with BatchNorm folding switched on when `enabled`; otherwise the options stay as
    they are (`TrainConfig.fold_batchnorm`, `costmodel.measure_step(fold_batchnorm=)`)."""
    validate.flag("enabled", enabled)
    return options(fold_batchnorm=True) if enabled else contextlib.nullcontext()


# ------------------------------------------------------------------------------- BatchNorm folding
def count_batchnorm(model: nn.Module) -> int:
    """Number of BatchNorm layers in `model`."""
    return sum(isinstance(m, _BATCHNORMS) for m in model.modules())


def _folded_weights(layer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of layer followed by bn (eval mode) as one layer: w·s, (b − μ)·s + β, s =
    γ/√(σ² + ε)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    folded_bias = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        folded_bias = folded_bias + bn.bias
    return layer.weight * scale.reshape(-1, *([1] * (layer.weight.dim() - 1))), folded_bias


def _can_fold(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(layer, _FOLDABLE) or not isinstance(bn, _BATCHNORMS):
        return False
    if bn.running_mean is None or bn.running_var is None:  # track_running_stats=False: batch stats
        return False
    return layer.weight.shape[0] == bn.num_features


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as err:  # fx raises many kinds of errors on untraceable Python control flow
        raise TypeError(f"fold_batchnorm: model {type(model).__name__} cannot be traced by "
                        f"torch.fx ({type(err).__name__}: {err}); use the model unfolded") from err


class _Folded:
    """A folded copy of one model and how to refresh it from the model's current weights."""

    def __init__(self, model: nn.Module):
        snapshot = copy.deepcopy(model)
        snapshot.eval()
        for p in snapshot.parameters():
            p.requires_grad_(False)
            p.grad = None
        gm = _trace(snapshot)
        found = dict(gm.named_modules())
        self.folds: list[tuple[str, str]] = []  # (layer name, BatchNorm name), as named in `model`
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(found.get(node.target), _BATCHNORMS):
                continue
            prev = node.args[0] if node.args else None
            if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module"
                    and len(prev.users) == 1
                    and _can_fold(found.get(prev.target), found[node.target])):
                continue
            layer = found[prev.target]
            if layer.bias is None:
                zeros = layer.weight.new_zeros(layer.weight.shape[0])
                layer.bias = nn.Parameter(zeros, requires_grad=False)
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
            self.folds.append((prev.target, node.target))
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        self.module = gm.eval()
        folded_layers = {name for name, _ in self.folds}
        own = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
        self.copied = [name for name in own if name.rpartition(".")[0] not in folded_layers]
        self.key = _placement(model)
        self.refresh(model)

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        """Copy the model's current weights into the folded copy (folding each BatchNorm again)."""
        modules = dict(model.named_modules())
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        own = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
        for layer_name, bn_name in self.folds:
            weight, bias = _folded_weights(modules[layer_name], modules[bn_name])
            own[f"{layer_name}.weight"].copy_(weight)
            own[f"{layer_name}.bias"].copy_(bias)
        for name in self.copied:
            own[name].copy_(state[name])


def _placement(model: nn.Module) -> tuple:
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.device, t.dtype, t.shape) for t in tensors)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with each BatchNorm that directly follows a convolution or
    linear layer folded into it (a BatchNorm after a sum, as in pre-activation blocks, stays).
    Chapter 9.

    The copy computes the eval-mode function of `model` exactly up to float rounding; its parameters
    do not require gradients (an attack needs gradients to the input only) and it shares no tensor
    with `model`. Raises TypeError when torch.fx cannot trace the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return _Folded(model).module


_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_warned: set = set()


def attack_model(model: nn.Module | None, *, enabled: bool | None = None) -> nn.Module | None:
    """The module an attack should run: with folding on (`enabled`, default
    `current().fold_batchnorm`), a BatchNorm-folded eval-mode copy refreshed from the model's
    current weights (built once per model and reused); otherwise, or for a model without BatchNorm,
    a compiled model or None, the argument itself. A model torch.fx cannot trace is used unfolded,
    with one warning. Chapter 9.
    """
    on = current().fold_batchnorm if enabled is None else enabled
    if not isinstance(on, bool):
        raise TypeError(f"enabled must be True, False or None; got {on!r}")
    if not on or model is None:
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    compiled = hasattr(model, "_orig_mod")
    if isinstance(model, torch.fx.GraphModule) or compiled or not count_batchnorm(model):
        return model
    folded = _cache.get(model)
    try:
        if folded is None or folded.key != _placement(model):
            folded = _cache[model] = _Folded(model)
        else:
            folded.refresh(model)
    except TypeError as err:
        if type(model) not in _warned:
            _warned.add(type(model))
            warnings.warn(f"{err}; the attack runs on the unfolded model", RuntimeWarning,
                          stacklevel=2)
        return model
    return folded.module


# ---------------------------------------------------------------------------- the other fast paths
def no_grad():
    """The context for gradient-free passes: `torch.inference_mode()` when
    `current().inference_mode`, else `torch.no_grad()`. A tensor made under inference mode cannot be
    saved for a later backward pass: `.clone()` it outside the block before it enters a graph."""
    return torch.inference_mode() if current().inference_mode else torch.no_grad()


def prepare_model(model: nn.Module, *, channels_last: bool | None = None,
                  compile: bool | None = None) -> nn.Module:
    """`model` in channels_last memory format and/or wrapped by `torch.compile` (defaults:
    `current()`). Returns the module to call; the parameters stay those of `model`."""
    fast = current()
    channels_last = fast.channels_last if channels_last is None else channels_last
    compile = fast.compile if compile is None else compile
    for name, value in (("channels_last", channels_last), ("compile", compile)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True, False or None; got {value!r}")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


def autocast(device: str | torch.device, *, enabled: bool | None = None):
    """bfloat16 autocast on `device` when `enabled` (default `current().bf16`), else a no-op
    context."""
    on = current().bf16 if enabled is None else enabled
    if not isinstance(on, bool):
        raise TypeError(f"enabled must be True, False or None; got {on!r}")
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def configure_backend(device: str | torch.device) -> None:
    """On a GPU, set cudnn.benchmark as `current().cudnn_benchmark` says; nothing on other
    devices."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = current().cudnn_benchmark
