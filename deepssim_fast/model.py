"""The DeepSSIM encoder: a CNN backbone plus a projection head, and inference on top of it.

Model
-----
The paper's encoder and its relatives (``convnext_base``, ``convnext_tiny``, ``resnet18``):
``backbone features -> AdaptiveAvgPool2d(1) -> BatchNorm1d(feat) -> Linear(feat, 512) -> GELU ->
Dropout(0.33) -> Linear(512, emb_dim)`` (emb_dim 256 by default). Grayscale input (N, 1, H, W) is repeated to
3 channels inside the network; (N, 3, H, W) is used as given.

The ``small`` encoder has a different, SSIM-shaped head (a deliberate departure from "the same head"):
``backbone map (N, 64, S/8, S/8) -> AdaptiveAvgPool2d(8) -> Conv2d(64, emb_dim / 64, 1) -> unit length per
cell -> / 8 -> flatten`` (emb_dim 256: 8 x 8 cells x 4 channels). The embedding is 8 x 8 cells of
(emb_dim / 64)-dimensional unit descriptors, so the cosine of two embeddings is exactly the MEAN over the
64 cells of the cosines of their local descriptors — the same shape as SSIM, a mean of local similarities.
With the paper's head (global average pool, MLP) a compact CNN trained for 5 CPU minutes reached MAE 0.19
against SSIM on unseen anatomy; with this head, 0.035 (BENCHMARKS.md, "encoder"). For an emb_dim that 64
does not divide, the grid is the largest g <= 8 with g^2 dividing emb_dim and at least two channels per cell
(32 -> 4 x 4 x 2, 64 -> 4 x 4 x 4; a one-channel cell would be its sign alone; emb_dim 1 is refused). Input
(N, 1, H, W); (N, 3, H, W) is averaged over channels.

Every network returns raw embeddings (N, emb_dim) (``small``'s already have unit length); the similarity of
two images is the cosine of their L2-normalised embeddings.

Backbones (``build_model(backbone=...)``), all written here (torchvision is not a dependency):

=================  =======  ==================================================================
name               feat     layout
=================  =======  ==================================================================
``convnext_base``  1024     torchvision ConvNeXt-Base ``features`` (depths 3-3-27-3), the paper's
``convnext_tiny``  768      torchvision ConvNeXt-Tiny ``features`` (depths 3-3-9-3)
``resnet18``       512      torchvision ResNet-18 without ``avgpool``/``fc``
``small``          64       a compact residual CNN (3 stride-2 stages, widths 16-32-64, 0.19 M parameters with its
                            head) that trains in minutes on 2 CPU cores; local-descriptor head
=================  =======  ==================================================================

Parameter names follow torchvision, so an ImageNet state_dict file (``convnext_base-*.pth``,
``resnet18-*.pth``) given by LOCAL path loads into the backbone with strict key matching (its classifier,
``classifier.*`` / ``fc.*``, is dropped). Nothing is ever downloaded; without a file the backbone is
trained from scratch.

Freezing (``freeze_stages=True``): the reference freezes every backbone parameter whose name contains the
character ``'0'`` or ``'1'``, which on ConvNeXt-Base catches most of the network (``features.5.10...``,
``features.3.1...``, every ``...block.0.weight``) although its comment says "first two stages". Here the
rule does what the comment says: stages 0-1 are frozen, i.e. ``features.0`` (stem) and ``features.1``
(first block stage) for ConvNeXt and ``small``, ``conv1``/``bn1`` and ``layer1`` for ResNet-18.

Preprocessing and size policy (the same in training, :func:`embed` and the exported TorchScript file)
----------------------------------------------------------------------------------------------------
Each 2D image is brought to ``input_size`` x ``input_size`` (``model.config``) by ``size_policy``:

* ``"fit"`` (default): :func:`deepssim_fast.data.center_fit` — centre crop or pad with the image's minimum
  (background), no resampling, so pixel values and SSIM structure are kept;
* ``"resize"``: bilinear resampling with antialiasing to the square (aspect ratio not kept);
* ``"pad"``: letterbox — pad the shorter side with the image's minimum (background) to a centred square,
  then resize as above: the whole slice, aspect ratio kept (the policy of the acceptance run, BENCHMARKS.md);

then z-scored per image, ``(x - mean) / std`` (population std; a constant image becomes zeros). The network
(eager or TorchScript) expects this z-scored input, (N, 1, S, S) or (N, 3, S, S) with equal channels; it
does NOT apply ImageNet mean/std. :func:`embed` always applies this preprocessing, for our models and for
foreign TorchScript files alike; a foreign file (the published DeepSSIM weights, whose ConvNeXt stem takes 3
channels) gets the z-scored image as 3 equal channels, as the reference feeds it. A fit that keeps less than
half of an image's pixels, or makes it more than half padding, is said in one warning per call of :func:`embed`,
:func:`embed_volume`, ``train`` and ``make_pool`` (:func:`embed`'s once per model and image size, as an audit
embeds a batch per call): the centre crop left a change outside it invisible, without a word.

Trust: checkpoints load with ``torch.load(weights_only=True)``. TorchScript files can run code: load only
model files you trust. Nothing is fetched from the network.

3D volumes: :func:`embed_volume` embeds every slice (cut by a :class:`~deepssim_fast.data.SlicePolicy`) and
aggregates by the mean of the L2-normalised slice embeddings, L2-normalised again (the normalised mean
direction); the per-slice embeddings are returned too.
"""
from __future__ import annotations

import contextvars
import copy
import json
import logging
import os
import re
import threading
import warnings
import weakref
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._atomic import atomic_write as _atomic_write
from ._ssim_common import zscore as _zscore
from .io import MIN_SLICE_SIDE
from .io import fit_float32 as _to_float32

logger = logging.getLogger(__name__)

BACKBONES = ("convnext_base", "convnext_tiny", "resnet18", "small")
SIZE_POLICIES = ("fit", "resize", "pad")
SMALL_WIDTHS = (16, 32, 64)
LOCAL_GRID = 8  # the ``small`` encoder's embedding: LOCAL_GRID x LOCAL_GRID cells x (emb_dim / 64) channels
CHECKPOINT_FORMAT = "deepssim_fast.checkpoint"
# The version of :func:`preprocess` (what an encoder is fed), part of the audit's embedding cache keys, so a
# change that gives other embeddings never reuses those cached before it. 2: a constant image z-scores to
# zeros whatever its value and batch, and stays exactly constant under the "resize" and "pad" size policies.
PREPROCESS_VERSION = 2
_TS_EXTRA = "deepssim_fast.json"


@contextmanager
def _quiet_jit():
    """torch >= 2.10 marks torch.jit deprecated; TorchScript is still the published weights' format."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
        yield


class ModelFileError(ValueError):
    """A model file is neither a deepssim_fast checkpoint nor a TorchScript archive (or is broken)."""


# ----------------------------------------------------------------------------------------------------------
# Building blocks (torchvision-compatible names)
# ----------------------------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of (N, C, H, W) input (torchvision's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(self.dims)


class StochasticDepth(nn.Module):
    """Drop the whole residual branch per sample with probability ``p`` in training ("row" mode)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=x.dtype, device=x.device)
        noise = noise.bernoulli_(keep).div_(keep)
        return x * noise


class CNBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 -> LayerNorm -> Linear(4x) -> GELU -> Linear -> layer scale, residual."""

    def __init__(self, dim: int, layer_scale: float, sd_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


class ConvNeXtFeatures(nn.Module):
    """torchvision ``ConvNeXt.features`` (as ``self.features``): stem, then stages and downsamplers.

    Input (N, 3, H, W) -> (N, dims[-1], H/32, W/32).
    """

    def __init__(self, depths: Sequence[int], dims: Sequence[int], sd_prob: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4, bias=True),
                                                 LayerNorm2d(dims[0], eps=1e-6))]
        total = sum(depths)
        block_id = 0
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            blocks = []
            for _ in range(depth):
                p = sd_prob * block_id / (total - 1.0)
                blocks.append(CNBlock(dim, 1e-6, p))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6),
                                            nn.Conv2d(dim, dims[i + 1], kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class BasicBlock(nn.Module):
    """ResNet basic block (torchvision names: conv1, bn1, conv2, bn2, downsample)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet18Features(nn.Module):
    """torchvision ResNet-18 up to ``layer4`` (no avgpool/fc). Input (N, 3, H, W) -> (N, 512, H/32, W/32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64, 1), BasicBlock(64, 64, 1))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128, 1))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256, 1))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class _SmallRes(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.gelu(self.bn1(self.conv1(x)))
        return F.gelu(x + self.bn2(self.conv2(out)))


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.GELU())


class SmallFeatures(nn.Module):
    """Compact fully convolutional CNN for the ``small`` encoder: three stride-2 stages (3x3 convolution, batch
    norm, GELU, one residual block each) and a last residual block, widths ``widths``.

    Input (N, 1, S, S) -> (N, widths[-1], S/8, S/8). ``features.0`` is the stem stage (stride 2 at full
    resolution: fine structure reaches the features before any downsampling, which SSIM's 7x7 window needs),
    ``features.1`` / ``features.2`` the next stages, ``features.3`` the last residual block.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        w = [1, *widths]
        stages = [nn.Sequential(nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1, bias=False),
                                nn.BatchNorm2d(w[i + 1]), nn.GELU(), _SmallRes(w[i + 1])) for i in range(3)]
        self.features = nn.Sequential(*stages, _SmallRes(w[3]))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


_CLASSIFIER_PREFIX = {"convnext_base": "classifier.", "convnext_tiny": "classifier.", "resnet18": "fc.",
                      "small": None}
_FROZEN_PREFIXES = {"convnext_base": ("features.0.", "features.1."),
                    "convnext_tiny": ("features.0.", "features.1."),
                    "resnet18": ("conv1.", "bn1.", "layer1."),
                    "small": ("features.0.", "features.1.")}


def make_backbone(name: str, input_size: int = 128) -> tuple[nn.Module, int]:
    """(backbone module, feature channels) for a backbone name (see the module table)."""
    if name == "convnext_base":
        return ConvNeXtFeatures((3, 3, 27, 3), (128, 256, 512, 1024), sd_prob=0.5), 1024
    if name == "convnext_tiny":
        return ConvNeXtFeatures((3, 3, 9, 3), (96, 192, 384, 768), sd_prob=0.1), 768
    if name == "resnet18":
        return ResNet18Features(), 512
    if name == "small":
        return SmallFeatures(SMALL_WIDTHS), SMALL_WIDTHS[-1]
    raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")


def frozen_parameter_names(backbone: str, names: Iterable[str]) -> list[str]:
    """Which backbone parameter names the freeze rule (stages 0-1) freezes, from ``names``."""
    prefixes = _FROZEN_PREFIXES[backbone]
    return [n for n in names if n.startswith(prefixes)]


# ----------------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (stored in checkpoints and TorchScript files)."""

    backbone: str = "small"
    emb_dim: int = 256
    input_size: int = 128
    size_policy: str = "fit"
    freeze_stages: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {BACKBONES}")
        if not (isinstance(self.emb_dim, (int, np.integer)) and self.emb_dim >= 1):
            raise ValueError(f"emb_dim must be a positive integer, got {self.emb_dim!r}")
        if self.backbone == "small":
            local_grid(int(self.emb_dim))  # (>= 2 channels per cell; raises for emb_dim 1)
        if not (isinstance(self.input_size, (int, np.integer)) and self.input_size >= 32):
            raise ValueError(f"input_size must be an integer >= 32, got {self.input_size!r}")
        if self.size_policy not in SIZE_POLICIES:
            raise ValueError(f"size_policy must be one of {SIZE_POLICIES}, got {self.size_policy!r}")


    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = ("backbone", "emb_dim", "input_size", "size_policy", "freeze_stages", "extra")
        known = {k: d[k] for k in names if k in d}
        return cls(**known)


def local_grid(emb_dim: int) -> int:
    """Cells per side of the ``small`` embedding: the largest g <= 8 with g^2 dividing emb_dim and at least two
    channels per cell (8 for 256, 4 for 64). A cell of one channel, normalised to unit length, is its sign
    alone: emb_dim = 64 on an 8 x 8 grid gave every image the same embedding, and no gradient."""
    g = next((g for g in range(LOCAL_GRID, 0, -1) if emb_dim % (g * g) == 0 and emb_dim // (g * g) >= 2), None)
    if g is None:
        raise ValueError(f"emb_dim {emb_dim} is too small for the 'small' encoder's local head (>= 2 needed)")
    return g


class DeepSSIMNet(nn.Module):
    """Backbone + pooling + the paper's head. ``forward``: (N, 1|3, H, W) z-scored -> (N, emb_dim) raw.

    ``self.config`` (:class:`ModelConfig`) says the input size and size policy :func:`embed` uses.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # the config as a plain string attribute survives torch.jit.script, so a file written by a bare
        # torch.jit.save (without save_torchscript's extra file) still loads with its input size and policy
        self.config_json: str = json.dumps(config.to_dict())
        self.backbone, feat = make_backbone(config.backbone, config.input_size)
        self.local = config.backbone == "small"
        if self.local:
            # local-descriptor head (see the module docstring): cell average, 1x1 projection to emb_dim / 64
            # channels, unit length per cell, so the cosine of two embeddings is the mean of 64 local cosines
            self.grid = local_grid(config.emb_dim)
            self.pool = nn.AdaptiveAvgPool2d(self.grid)
            self.head = nn.Sequential(nn.Conv2d(feat, config.emb_dim // (self.grid * self.grid), 1))
        else:
            self.grid = 1
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Sequential(
                nn.BatchNorm1d(feat),
                nn.Linear(feat, 512),
                nn.GELU(),
                nn.Dropout(0.33),
                nn.Linear(512, config.emb_dim),
            )
        self.feat_dim = feat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or (x.shape[1] != 1 and x.shape[1] != 3):
            raise ValueError("expected input of shape (N, 1, H, W) or (N, 3, H, W), got "
                             + str(list(x.shape)))
        if self.local:
            if x.shape[1] == 3:
                x = x.mean(dim=1, keepdim=True)
            f = self.head(self.pool(self.backbone(x)))
            return (F.normalize(f, dim=1) / float(self.grid)).flatten(1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        f = self.pool(self.backbone(x)).flatten(1)
        if self.training or f.shape[0] <= 1:
            return self.head(f)
        # in eval mode one row at a time: the Linear layers' GEMM rounds a row by the batch it is in (1.5e-7
        # for resnet18 between batches of 1, 2, 3, 5 and 8), so an image's embedding would depend on which
        # others were embedded with it (a resume, a changed file); the head is a small share of a forward
        return torch.cat([self.head(f[i:i + 1]) for i in range(f.shape[0])])

    # -- freezing / weights ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DeepSSIMNet:
        """As :meth:`torch.nn.Module.train`, but the BatchNorm layers of frozen stages stay in eval mode: in
        train mode their running statistics still moved with every batch, so a "frozen" stem computed
        something else after training (``small``, ``resnet18``; ConvNeXt has LayerNorm)."""
        super().train(mode)
        if mode:
            for m in self.backbone.modules():
                ps = list(m.parameters(recurse=False))
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and ps and not any(p.requires_grad for p in ps):
                    m.eval()
        return self

    def freeze_stages(self) -> list[str]:
        """Freeze backbone stages 0-1 (see the module docstring); returns the frozen parameter names."""
        names = frozen_parameter_names(self.config.backbone, [n for n, _ in self.backbone.named_parameters()])
        chosen = set(names)
        for n, p in self.backbone.named_parameters():
            if n in chosen:
                p.requires_grad_(False)
        logger.info("froze %d backbone parameter tensors (stages 0-1 of %s)", len(names),
                    self.config.backbone)
        return names

    def load_backbone_weights(self, path: str | os.PathLike) -> None:
        """Load a torchvision ImageNet state_dict file (local path) into the backbone, strict key matching."""
        load_backbone_weights(self.backbone, self.config.backbone, path)

    # -- export ------------------------------------------------------------------------------------------
    def save_torchscript(self, path: str | os.PathLike) -> Path:
        """Write the network as TorchScript (``torch.jit.load(path)(batch)`` -> (N, emb_dim) embeddings).

        The file holds the eval-mode network; input is z-scored (N, 1|3, S, S) as described in the module
        docstring. The model config is stored as the extra file ``deepssim_fast.json``. Written atomically.
        """
        net = copy.deepcopy(self).cpu().eval()
        with _quiet_jit():
            scripted = torch.jit.script(net)
        extra = {_TS_EXTRA: json.dumps(self.config.to_dict())}
        return _atomic_write(path, lambda f: _jit_save(scripted, f, extra))

    def save_checkpoint(self, path: str | os.PathLike, **state: Any) -> Path:
        """Write a weights-only checkpoint (model state + config, plus any plain ``state``), atomically."""
        return save_checkpoint(path, self, **state)


class TorchScriptEncoder(nn.Module):
    """A loaded TorchScript encoder (ours or the published DeepSSIM weights) with a :class:`ModelConfig`.

    ``forward``: (N, 1|3, S, S) z-scored -> (N, emb_dim) raw. Our own files take the input as given. A foreign
    file (no stored config, ``config.extra["foreign"]``: the published DeepSSIM encoder) gets grayscale
    (N, 1, S, S) input repeated to 3 equal channels, as the reference feeds it: its ConvNeXt stem takes 3
    channels and its forward does not repeat them. The exception is a foreign file whose first convolution
    (its first 4-D parameter) takes one channel: it gets the grayscale input as it is.
    """

    def __init__(self, module: torch.jit.ScriptModule, config: ModelConfig) -> None:
        super().__init__()
        self.module = module
        self.config = config
        self._repeat_to_3 = bool(config.extra.get("foreign")) and _first_conv_channels(module) != 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._repeat_to_3 and x.dim() == 4 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.module(x)

    def save_torchscript(self, path: str | os.PathLike) -> Path:
        extra = {_TS_EXTRA: json.dumps(self.config.to_dict())}
        return _atomic_write(path, lambda f: _jit_save(self.module, f, extra))


def _first_conv_channels(module: nn.Module) -> int | None:
    """Input channels of a module's first 2D convolution, read from its first 4-D parameter
    (out_channels, in_channels, kh, kw); None when it has none."""
    for p in module.parameters():
        if p.dim() == 4:
            return int(p.shape[1])
    return None


def build_model(backbone: str = "small", *, pretrained: str | os.PathLike | None = None, emb_dim: int = 256,
                input_size: int | None = None, size_policy: str = "fit", freeze_stages: bool = False
                ) -> DeepSSIMNet:
    """Build a :class:`DeepSSIMNet`.

    ``pretrained``: a LOCAL torchvision ImageNet state_dict file for ``convnext_*``/``resnet18`` (never
    downloaded). ``input_size`` defaults to 224 for ConvNeXt-Base (the paper) and 128 otherwise.
    """
    if input_size is None:
        input_size = 224 if backbone == "convnext_base" else 128
    cfg = ModelConfig(backbone=backbone, emb_dim=int(emb_dim), input_size=int(input_size),
                      size_policy=size_policy, freeze_stages=bool(freeze_stages))
    net = DeepSSIMNet(cfg)
    if pretrained is not None:
        net.load_backbone_weights(pretrained)
    if freeze_stages:
        net.freeze_stages()
    return net


def load_backbone_weights(backbone: nn.Module, name: str, path: str | os.PathLike) -> None:
    """Strictly load a torchvision state_dict file into ``backbone`` (its classifier keys are dropped)."""
    p = Path(path)
    prefix = _CLASSIFIER_PREFIX.get(name)
    if prefix is None:
        raise ValueError(f"backbone {name!r} has no ImageNet weights; pretrained= is for "
                         f"convnext_base, convnext_tiny and resnet18")
    if p.is_dir():
        raise IsADirectoryError(f"pretrained weights {p}: a folder; give the local path of torchvision's "
                                f"{name}-*.pth file")
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights {p}: no such file (weights are never downloaded; "
                                f"give the local path of torchvision's {name}-*.pth)")
    incomplete = _incomplete_zip(p)
    if incomplete is not None:
        raise incomplete
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a state dict file"
        # (torch's own text advised weights_only=False, 600 characters of it: unsafe, and beside the point)
        why = ("a safe weights-only torch.load could not read it: not a torch file, or one holding pickled "
               "Python objects" if "weights_only" in str(exc) or "Weights only" in str(exc)
               else f"{type(exc).__name__}: {_torch_text(str(exc))}")
        raise ModelFileError(f"{p}: not a readable state_dict file ({why})") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFileError(f"{p}: expected a torchvision state_dict (name -> tensor)")
    sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    try:
        result = backbone.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # (shapes that differ: torch's message named no file)
        first = str(exc).strip().splitlines()
        raise ModelFileError(f"{p}: tensors do not fit torchvision's {name} layout "
                             f"({' '.join(x.strip() for x in first[1:3]) or first[0] if first else exc})") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ModelFileError(
            f"{p}: keys do not match torchvision's {name} layout: missing {result.missing_keys[:5]}"
            f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            f"{'...' if len(result.unexpected_keys) > 5 else ''}")
    logger.info("loaded %d ImageNet backbone tensors for %s from %s", len(sd), name, p)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
def _jit_save(module: Any, f: Any, extra: dict[str, str]) -> None:
    with _quiet_jit():
        torch.jit.save(module, f, _extra_files=extra)


def save_checkpoint(path: str | os.PathLike, model: DeepSSIMNet, **state: Any) -> Path:
    """Atomically torch.save ``{"format", "config", "model", **state}`` (plain state, weights_only-safe)."""
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "config": model.config.to_dict(),
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    payload.update(state)
    return _atomic_write(path, lambda f: torch.save(payload, f))


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _check_model_path(p: Path) -> None:
    """A missing path or a directory is an error that says which."""
    if p.is_dir():
        hint = next((f" (e.g. {p / n})" for n in ("best.pt", "last.pt") if (p / n).is_file()), "")
        raise ModelFileError(f"model file {p} is a directory; give the checkpoint or TorchScript file "
                             f"itself{hint}")
    if not p.is_file():
        raise FileNotFoundError(f"model file {p}: no such file")


#: Words whose full stop ends no sentence, for :func:`_torch_text` ("e.g. this ..." was cut to "e.g.")
_ABBREVIATIONS = frozenset({"e.g.", "i.e.", "etc.", "vs.", "cf.", "viz.", "approx.", "resp.", "incl.", "no."})


def _torch_text(text: str, limit: int = 200) -> str:
    """torch's message ``text`` on one line for an error of ours: whole when it is at most ``limit``
    characters, else up to the end of its last sentence that ends within them (what follows is torch's advice
    to its own developers: "This is an internal miniz error. If you are seeing this error, there is a high
    ..."), or whole when no sentence ends there: never cut in the middle of a sentence. The full stop of an
    abbreviation (:data:`_ABBREVIATIONS`: "e.g.", "etc.") ends no sentence."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    ends = [m.end() for m in re.finditer(r"\S*[.!?](?=\s)", text[:limit + 1])
            if m.group(0).lstrip("([{'\"").lower() not in _ABBREVIATIONS]
    return text[:ends[-1]] if ends else text


#: The signature of a zip archive's first local file header, how checkpoints, TorchScript files and
#: torchvision weights start (a text file starting with "PK" was called a truncated model file)
_ZIP_START = b"PK\x03\x04"
#: The signature of a zip archive's end-of-central-directory record, which a truncated archive lacks
_ZIP_END = b"PK\x05\x06"


def _incomplete_zip(p: Path) -> ModelFileError | None:
    """The error for ``p`` when it starts as a zip archive (as checkpoints, TorchScript files and torchvision
    weights do) whose directory, at its end, cannot be read: a truncated file, as an interrupted copy or
    download leaves (torch said "PytorchStreamReader failed reading zip archive: failed finding central
    directory", and the file was called no model file at all), when its end-of-central-directory record is
    missing, else a damaged one; None when it is no such file (one that does not start with a zip's local
    file header, as a text file starting with "PK", is for the loaders to call no model file)."""
    try:
        with open(p, "rb") as f:
            if f.read(4) != _ZIP_START:
                return None
        with zipfile.ZipFile(p):
            return None
    except (zipfile.BadZipFile, EOFError, ValueError):
        pass
    except OSError:
        return None  # (unreadable: the loaders say so)
    try:  # (the record is within the last 64 KiB + 22 bytes: its comment is at most 65535 bytes)
        with open(p, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - (65535 + 22)))
            tail = f.read()
    except OSError:
        return None
    at = tail.rfind(_ZIP_END)  # (whole: its 22 bytes and the comment whose length it gives; a cut leaves part)
    if at >= 0 and len(tail) - at >= 22 + int.from_bytes(tail[at + 20:at + 22], "little"):
        return ModelFileError(f"{p}: damaged model file: it is a zip archive, as model files are, but its "
                              "directory cannot be read (an incomplete copy or download, or a disk error?); "
                              "copy it again")
    return ModelFileError(f"{p}: incomplete model file: it starts as a zip archive, as model files do, but "
                          "the directory at its end is missing (truncated: an interrupted copy or download?); "
                          "copy it again")


def _check_archive(p: Path) -> None:
    """A ModelFileError when zip archive ``p`` (checkpoints and TorchScript files are zips) is truncated
    (:func:`_incomplete_zip`), or naming its first entry whose CRC does not match its data. torch does not
    check them: a file with 8 KB overwritten loaded without a word and moved embeddings by up to 0.012. (Reads
    the file once: ~0.3 s for 350 MB.)"""
    incomplete = _incomplete_zip(p)
    if incomplete is not None:
        raise incomplete
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # not a zip: the loaders say what it is
    except Exception as exc:  # noqa: BLE001 - zlib errors of a damaged compressed entry and the like
        raise ModelFileError(f"{p}: damaged model file ({type(exc).__name__}: {exc}); copy it again") from exc
    if bad is not None:
        raise ModelFileError(f"{p}: damaged model file: its entry {bad!r} fails its CRC check (an incomplete "
                             "copy or download, or a disk error?); copy it again")


def _check_device(dev: torch.device) -> None:
    """A clear error for a CUDA device on a machine without one (torch's 'Torch not compiled with CUDA
    enabled' named no file and a TorchScript load blamed the file)."""
    if dev.type == "meta":  # (the model was moved there, its weights lost, and its lock left held)
        raise ValueError("device 'meta' holds no data: embeddings cannot be computed there; use 'cpu' or 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r}: CUDA is not available here (torch {torch.__version__}"
                         f"{', a CPU-only build' if torch.version.cuda is None else ''}); use device='cpu'")


def _unreadable_checkpoint(p: Path, exc: Exception) -> ModelFileError:
    """The error for a file a weights-only ``torch.load`` refused. torch's own message is left out when it
    advises ``weights_only=False`` (unsafe: it runs the file's pickled code) — what the file is matters here."""
    text = str(exc)
    try:  # (torch files are zip archives, or pickles of torch's legacy format, which start with b"\x80")
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        head = _ZIP_START
    if not head:
        why = "the file is empty"
    elif not head.startswith((_ZIP_START, b"\x80")):  # (a CSV said "IndexError: pop from empty list")
        why = "it is not a torch file at all (neither a zip archive nor a pickle)"
    elif "weights_only" in text or "Weights only" in text:
        why = (f"{type(exc).__name__}: a safe weights-only torch.load could not read it — it is not a torch "
               f"file, or it holds pickled Python objects, which are never loaded")
    else:
        first = _torch_text(text.strip().splitlines()[0]) if text.strip() else ""
        why = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return ModelFileError(f"{p}: not a deepssim_fast checkpoint or TorchScript file (expected a deepssim_fast "
                          f"checkpoint, the .pt written by train, or a TorchScript file; {why})")


def _is_bare_state_dict(obj: Any) -> bool:
    """A plain ``name -> tensor`` mapping, as ``torch.save(model.state_dict(), path)`` writes."""
    return (isinstance(obj, dict) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _bare_state_dict_error(p: Path, sd: dict) -> ModelFileError:
    """Say that ``p`` holds weights without a model config, and how to load them."""
    first = next(iter(sd))
    text = (f"{p} holds a bare state_dict ({len(sd)} tensors, first {first!r}), not a deepssim_fast "
            f"checkpoint or TorchScript file: it has the weights but not the model settings needed to "
            f"rebuild the network. Build the model with the settings it was trained with and load the "
            f"weights: model = deepssim_fast.build_model(backbone, emb_dim=..., input_size=..., "
            f"size_policy=...); model.load_state_dict(torch.load(path, weights_only=True)); then "
            f"model.save_checkpoint(path) (or model.save_torchscript(path)) writes a file that load_model "
            f"reads")
    if not any(k.startswith("backbone.") for k in sd):
        text += (" (if it is a torchvision ImageNet backbone file, give it to "
                 "build_model(backbone, pretrained=path) instead)")
    return ModelFileError(text)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw checkpoint dict (weights_only load); errors say what was expected."""
    p = Path(path)
    _check_model_path(p)
    _check_archive(p)
    if _is_torchscript(p):
        raise ModelFileError(f"{p} is a TorchScript file, not a training checkpoint")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise _unreadable_checkpoint(p, exc) from exc
    if _is_bare_state_dict(ck):
        raise _bare_state_dict_error(p, ck)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{p}: expected a deepssim_fast checkpoint (a dict with format="
                             f"{CHECKPOINT_FORMAT!r}) or a TorchScript file; got {type(ck).__name__}")
    missing = [k for k in ("model", "config") if not isinstance(ck.get(k), dict)]
    if missing:
        raise ModelFileError(f"{p}: damaged deepssim_fast checkpoint: no {' and no '.join(missing)} entry "
                             "(a dict) in it")
    _config_of(p, ck["config"])
    return ck


def _config_of(p: Path, d: Any) -> ModelConfig:
    """The :class:`ModelConfig` stored in model file ``p`` (``d``: its dict), or a ModelFileError naming the
    file and what is wrong with the settings."""
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ModelFileError(f"{p}: the model settings stored in it are not valid ({type(exc).__name__}: "
                             f"{exc})") from exc


def _no_overrides(p: Path, kind: str, cfg: ModelConfig, input_size: int | None, size_policy: str | None) -> None:
    """A model file that stores its preprocessing settings takes no other: ``input_size``/``size_policy``
    given with values other than the stored ones are an error (the encoder was trained with those)."""
    if (input_size is not None and int(input_size) != cfg.input_size) or (
            size_policy is not None and size_policy != cfg.size_policy):
        raise ValueError("input_size/size_policy overrides apply to foreign TorchScript files only; "
                         f"{p} is {kind} that stores its own (input_size={cfg.input_size}, "
                         f"size_policy={cfg.size_policy!r})")


#: Set by a caller that says itself which preprocessing settings a foreign TorchScript file is given (the
#: ``export`` command, which stores them in the copy it writes): :func:`load_model` then does not warn about them
_SETTINGS_SAID_BY_CALLER: contextvars.ContextVar[bool] = contextvars.ContextVar("_SETTINGS_SAID_BY_CALLER",
                                                                               default=False)


def load_model(path: str | os.PathLike, *, device: str | torch.device | None = None,
               input_size: int | None = None, size_policy: str | None = None) -> nn.Module:
    """Load a project checkpoint (:class:`DeepSSIMNet`) or a TorchScript file (:class:`TorchScriptEncoder`).

    The model is returned in eval mode. For a TorchScript file without our config (e.g. the published
    DeepSSIM weights) ``input_size`` defaults to 224 and ``size_policy`` to ``"resize"``; both can be given
    (on the command line, whose other commands take neither: ``deepssim-fast export --model F --input-size N
    --size-policy P --out G`` writes a copy G that stores them); the z-scored grayscale input reaches such a
    file as 3 equal channels (:class:`TorchScriptEncoder`).
    ``device``: where the model is loaded (default CPU; ``"cuda"`` needs a CUDA build of torch and a GPU).
    Load only trusted TorchScript files: they can run code.
    """
    p = Path(path)
    _check_model_path(p)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    _check_device(dev)
    if _is_torchscript(p):
        _check_archive(p)
        extra = {_TS_EXTRA: ""}
        try:
            with _quiet_jit():
                module = torch.jit.load(str(p), map_location=dev, _extra_files=extra)
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(f"{p}: looks like a TorchScript archive but could not be loaded "
                                 f"({type(exc).__name__}: {_torch_text(str(exc))})") from exc
        raw = extra.get(_TS_EXTRA) or ""
        if not raw:
            try:
                raw = str(getattr(module, "config_json", "") or "")
            except Exception:  # noqa: BLE001 - a foreign module without the attribute
                raw = ""
        if raw:
            try:
                stored = json.loads(raw)
            except ValueError as exc:
                raise ModelFileError(f"{p}: the model settings stored in it are not valid JSON ({exc})") from exc
            cfg = _config_of(p, stored)
            _no_overrides(p, "a TorchScript file of ours", cfg, input_size, size_policy)
        else:
            cfg = ModelConfig(backbone="convnext_base", emb_dim=256, input_size=224, size_policy="resize",
                              extra={"foreign": True})
            assumed = [(n, v) for n, v, given in (("input_size", 224, input_size),
                                                  ("size_policy", "resize", size_policy)) if given is None]
            if assumed and not _SETTINGS_SAID_BY_CALLER.get():  # (a traced copy of one of our encoders lands here
                # too, and would be fed wrongly; export, which writes the copy, says what it stores itself)
                # (the command line has no --input-size for embed, audit ...: export stores the settings in a
                # copy of the file, which every command then reads, as from ours. The assumed values are said in
                # words: the command line's log handler turns "input_size=224" into a flag, which embed lacks)
                import shlex

                flags = (f"--input-size {'N' if input_size is None else int(input_size)} --size-policy "
                         f"{'{' + ','.join(SIZE_POLICIES) + '}' if size_policy is None else size_policy}")
                logger.warning("%s stores no preprocessing settings; assuming the published DeepSSIM encoder's %s; "
                               "if it expects others, write a copy that stores them, `deepssim-fast export "
                               "--model %s %s --out FILE`, and give FILE as the model (in Python, "
                               "load_model(path, %s) also takes them)",
                               p, " and ".join(f"{n.replace('_', ' ')} {v}" for n, v in assumed),
                               shlex.quote(str(p)), flags, ", ".join(f"{n}=..." for n, _ in assumed))
        if input_size is not None:
            cfg.input_size = int(input_size)
        if size_policy is not None:
            cfg.size_policy = size_policy
        ModelConfig.__post_init__(cfg)
        enc = TorchScriptEncoder(module, cfg)
        enc.eval()
        if cfg.extra.get("foreign"):
            _probe_width(enc, dev)
        _MODEL_SOURCES[enc] = str(p)  # (the file its errors name: embed_batch)
        return enc
    ck = read_checkpoint(p)
    cfg = _config_of(p, ck["config"])
    _no_overrides(p, "a checkpoint", cfg, input_size, size_policy)
    net = DeepSSIMNet(cfg)
    try:
        net.load_state_dict(ck["model"], strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{p}: checkpoint weights do not fit backbone {cfg.backbone!r}: {exc}") from exc
    if cfg.freeze_stages:  # (a reloaded checkpoint had every stage trainable, its TorchScript copy not)
        net.freeze_stages()
    net = net.to(dev).eval()
    _MODEL_SOURCES[net] = str(p)  # (the file its errors name: embed_batch)
    return net


# ----------------------------------------------------------------------------------------------------------
# Images and preprocessing
# ----------------------------------------------------------------------------------------------------------
def _name_of(item: Any, i: int) -> str:
    key = getattr(item, "key", None)
    return f"image {i} ({key})" if isinstance(key, str) else f"image {i}"


def _tensor_numpy(t: torch.Tensor, name: str) -> np.ndarray:
    """A torch tensor as a host numpy array; float dtypes numpy lacks (bfloat16, float8) are widened to
    float32 first (exactly: every value of theirs is a float32). A tensor holding no data the host can copy
    (on the meta device, or sparse) is an error naming it (``name``), as ssim's are: ``.cpu()`` raised torch's
    "Cannot copy out of meta tensor; no data!"."""
    from ._arrays import check_readable

    check_readable(t, name, "embed")
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.float()
    return t.numpy()


def as_image_2d(item: Any, name: str) -> np.ndarray:
    """One grayscale image as a finite float32 2D array. Accepts (H, W), (1, H, W), equal-channel (3, H, W).

    Errors name the item (``name``) and quote the shape.
    """
    a = item.array if hasattr(item, "array") and hasattr(item, "source") else item
    if isinstance(a, torch.Tensor):
        a = _tensor_numpy(a, name)
    a = np.asarray(a)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise TypeError(f"{name}: expected a numeric array, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"{name}: complex dtype {a.dtype}; expected a real-valued image (pass np.abs(x) or "
                        f"x.real explicitly)")
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim == 3 and a.shape[0] == 3:
        if not (np.array_equal(a[0], a[1]) and np.array_equal(a[0], a[2])):
            raise ValueError(f"{name}: 3-channel image of shape {a.shape} with different channels; the "
                             f"encoder takes grayscale (H, W), (1, H, W) or (3, H, W) with equal channels")
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2D grayscale image (H, W), (1, H, W) or (3, H, W); got shape "
                         f"{a.shape} (for 3D volumes use embed_volume or deepssim_fast.data.volume_slices)")
    if min(a.shape) < MIN_IMAGE_SIDE:
        raise ValueError(f"{name}: image of shape {a.shape} is too small (each side must be >= {MIN_IMAGE_SIDE})")
    if a.dtype.kind == "f" and not np.isfinite(a).all():  # (before the cast: 1e39 in float64 is finite)
        raise ValueError(f"{name}: contains NaN or Inf values")
    return _to_float32(a)


#: The smallest side of an image the encoder takes (the SSIM window of its targets): the same number as the
#: smallest slice :mod:`deepssim_fast.io` cuts from a volume.
MIN_IMAGE_SIDE = MIN_SLICE_SIDE


def usable_slices(slices: Iterable[Any], *, strict: bool, skipped: list) -> list[Any]:
    """The slices read from files that the encoder can take. An image narrower than :data:`MIN_IMAGE_SIDE` is
    left out as an unreadable file is — logged, and ``(path, reason)`` appended to ``skipped`` — or with
    ``strict`` a :class:`~deepssim_fast.data.DataError` naming its file (it aborted a whole run after every
    image was read, named by its position among the files that were kept)."""
    from .data import DataError
    from .io import one_line

    out = []
    for s in slices:
        if min(s.array.shape) >= MIN_IMAGE_SIDE:
            out.append(s)
            continue
        reason = (f"{s.source}: image of shape {tuple(s.array.shape)} is too small for the encoder (each side "
                  f"must be >= {MIN_IMAGE_SIDE})")
        if strict:
            raise DataError(reason)
        logger.warning("skipping %s", one_line(reason))
        skipped.append((s.source, reason))
    return out


def collect_images(images: Any, *, policy: Any = None, what: str = "images", strict: bool = True,
                   skipped: list | None = None, keep_order: bool = False) -> tuple[list[np.ndarray], list[Any]]:
    """Turn the ``images`` argument into (list of 2D float32 arrays, list of Slice-or-None metadata).

    ``images``: a sequence of 2D arrays / torch tensors / :class:`deepssim_fast.data.Slice`; a stacked array
    (N, H, W) or (N, 1, H, W); a mapping key -> array; or paths (str/Path, directories, globs — PNG, .npy,
    NIfTI; volumes are cut by ``policy``) read through :mod:`deepssim_fast.io`. Paths: an unreadable file
    raises :class:`~deepssim_fast.data.DataError`, or with ``strict=False`` is logged, appended to
    ``skipped`` as ``(path, reason)`` and left out. A list of paths gives its files sorted, each once (a
    training pool), or with ``keep_order`` in the list's order, repeats kept (embed's rows).
    """
    from .data import Slice

    is_path = isinstance(images, (str, os.PathLike))
    if is_path or (isinstance(images, (list, tuple)) and images
                   and all(isinstance(x, (str, os.PathLike)) for x in images)):
        from . import io as dio

        skipped = skipped if skipped is not None else []
        # keep_order: a list keeps its order and its repeats (row i for the i-th file: discover of the whole list
        # sorted it and dropped repeats, so embed's rows lined up against the caller's list paired the wrong
        # images); each of its folders and globs gives its files in discover's order
        if is_path or not keep_order:
            files = dio.discover(images)
        else:
            files = [f for item in images for f in dio.discover(item)]
        slices = usable_slices(dio.iter_slices(files, policy, strict=strict, skipped=skipped),
                               strict=strict, skipped=skipped)
        arrays = [as_image_2d(s.array, _name_of(s, i)) for i, s in enumerate(slices)]
        return arrays, slices
    if isinstance(images, dict):
        metas: list[Any] = []
        arrays = []
        for i, (k, v) in enumerate(images.items()):
            arrays.append(as_image_2d(v, f"{what}[{k!r}]"))
            metas.append(Slice(arrays[-1], str(k), 0, i))
        return arrays, metas
    if isinstance(images, (np.ndarray, torch.Tensor)):
        shape = tuple(images.shape)
        if len(shape) == 4 and shape[1] in (1, 3):
            seq = [images[i] for i in range(shape[0])]
        elif len(shape) == 3:
            seq = [images[i] for i in range(shape[0])]
        elif len(shape) == 2:
            seq = [images]
        else:
            raise ValueError(f"{what}: expected a stack of 2D images (N, H, W) or (N, 1|3, H, W), "
                             f"got shape {shape}")
    else:
        try:
            seq = list(images)
        except TypeError:
            raise TypeError(f"{what}: expected a sequence of 2D images or paths, got {type(images).__name__}"
                            ) from None
    arrays, metas = [], []
    for i, item in enumerate(seq):
        nm = f"{what}[{i}]" + (f" ({item.key})" if isinstance(item, Slice) else "")
        arrays.append(as_image_2d(item, nm))
        metas.append(item if isinstance(item, Slice) else None)
    return arrays, metas


def fit_size(image: np.ndarray, size: int, policy: str) -> np.ndarray:
    """Bring a 2D image to (size, size) by the size policy (``"fit"``: centre crop/pad; ``"resize"``;
    ``"pad"``: letterbox to a square with the image's minimum, then resize). A constant image stays exactly
    constant under every policy (so its z-score is zeros, as documented)."""
    from .data import center_fit

    if image.shape == (size, size):
        return np.ascontiguousarray(image, dtype=np.float32)
    if policy == "fit":
        return np.ascontiguousarray(center_fit(image, (size, size)), dtype=np.float32)
    if policy == "pad":
        h, w = image.shape
        if h != w:
            side = max(h, w)
            sq = np.full((side, side), float(np.min(image)) if image.size else 0.0, dtype=np.float32)
            y0, x0 = (side - h) // 2, (side - w) // 2
            sq[y0:y0 + h, x0:x0 + w] = image
            image = sq
        policy = "resize"
        if image.shape == (size, size):
            return np.ascontiguousarray(image, dtype=np.float32)
    if policy == "resize":
        lo, hi = (float(np.min(image)), float(np.max(image))) if image.size else (0.0, 0.0)
        if lo == hi:
            # a constant image stays exactly constant: resampled in float32 it picks up rounding noise of
            # ~1e-7 of its value, which the per-image z-score would blow up to a unit-variance pattern
            # (blank slices of different values then embedded as unrelated images; their SSIM is 1)
            return np.full((size, size), lo, dtype=np.float32)
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        r = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return r[0, 0].numpy()
    raise ValueError(f"size_policy must be one of {SIZE_POLICIES}, got {policy!r}")


def _fit_loss(shape: Sequence[int], size: int, policy: str) -> str | None:
    """What the size policy loses of an image of ``shape`` at ``size`` x ``size``: ``"crop"`` when the centre
    crop keeps less than half its pixels, ``"pad"`` when it becomes more than half padding (``"fit"`` pads a
    small image, ``"pad"`` letterboxes an elongated one), else None (a resize keeps the whole image)."""
    h, w = (int(n) for n in shape)
    if policy == "fit":
        kept = min(h, size) * min(w, size)
        if 2 * kept < h * w:
            return "crop"
        if 2 * kept < size * size:
            return "pad"
    elif policy == "pad" and 2 * h * w < max(h, w) ** 2:
        return "pad"
    return None


class _FitLosses:
    """The images of one call that the size policy crops to less than half or pads to more than double
    (:func:`fit_losses_said`): per kind, their number and the first one's shape."""

    def __init__(self, what: str, net: nn.Module | None) -> None:
        self.what, self.net = what, net
        self.total = 0
        self.size, self.policy = 0, "fit"
        self.kinds: dict[str, list] = {}

    def add(self, shapes: Iterable[Sequence[int]], config: ModelConfig, times: int = 1) -> None:
        """Count the images of ``shapes``, each shape standing for ``times`` images."""
        self.size, self.policy = int(config.input_size), config.size_policy
        for shape in shapes:
            self.total += times
            kind = _fit_loss(shape, self.size, self.policy)
            if kind is not None:
                self.kinds.setdefault(kind, [0, tuple(int(n) for n in shape)])[0] += times

    def messages(self) -> list[tuple[tuple, str]]:
        """Per kind of loss, its key (kind, image size, input size, policy) and the warning's text."""
        out = []
        for kind, (n, (h, w)) in self.kinds.items():
            s, p = self.size, self.policy
            if kind == "crop":
                lost = (f"lose more than half their pixels to the centre crop to the model's input size {s} x {s} "
                        f"(size policy {p!r}): the encoder sees only their centre, and a change outside it does "
                        "not change their embedding; a model trained with --size-policy pad (size_policy='pad': "
                        "the whole image, letterboxed and resized) or resize, or with an --input-size "
                        "(input_size=) near the images' sides, sees the whole of each")
            elif p == "fit":
                lost = (f"are more than half padding at the model's input size {s} x {s} (size policy {p!r}): the "
                        "encoder sees mostly padding; a model trained with --size-policy resize (size_policy="
                        "'resize') or with an --input-size (input_size=) near the images' sides does not pad them")
            else:
                lost = (f"are more than half padding at the model's input size {s} x {s} (size policy {p!r}, a "
                        "letterbox to a square): the encoder sees mostly padding; a model trained with "
                        "--size-policy resize (size_policy='resize', aspect ratio not kept) does not pad them, or "
                        "crop the images nearer to a square first")
            out.append(((kind, h, w, s, p), f"{n} of {self.total} {self.what} (e.g. {h} x {w}) {lost}"))
        return out

    def say(self) -> None:
        said = _FIT_LOSSES_SAID.setdefault(self.net, set()) if self.net is not None else set()
        for key, text in self.messages():
            if key in said:
                continue
            said.add(key)
            # (not one of an audit's results: the audit embeds in fit_losses_said(say=False) and says it of
            # all its items itself, from their size, also when its embeddings are cached: fit_loss_warnings)
            logger.warning("%s", text, extra={"audit_result": False})


# What was said of each model (kind, image size, input size, policy), not said again: a caller may embed its
# images in a call per batch (held by weak reference, as _MODEL_SOURCES)
_FIT_LOSSES_SAID: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FIT_LOSSES: contextvars.ContextVar[_FitLosses | None] = contextvars.ContextVar("_FIT_LOSSES", default=None)


@contextmanager
def fit_losses_said(what: str, net: nn.Module | None = None, *, say: bool = True) -> Iterator[_FitLosses]:
    """Collect what the size policy loses of the images of a call (``add``), and say it in one warning at the
    end, naming an image's size, the input size, how many ``what`` and the way out. Nested calls (train's
    make_pool, embed_volume's embed) add to the outermost one, which alone warns; with ``net``, a loss said
    for that model before (the same kind, image and input size) is not said again. ``say=False``: the calls
    within say nothing (a caller that says it itself, of all its images: :func:`fit_loss_warnings`)."""
    outer = _FIT_LOSSES.get()
    if outer is not None:
        yield outer
        return
    losses = _FitLosses(what, net)
    token = _FIT_LOSSES.set(losses)
    try:
        yield losses
    finally:
        _FIT_LOSSES.reset(token)
    if say:
        losses.say()


def fit_loss_warnings(shape: Sequence[int], n: int, config: ModelConfig, what: str) -> list[str]:
    """The warning :func:`fit_losses_said` gives for ``n`` images of ``shape`` (``what``: what they are) fed to
    a model of ``config``, or none when its size policy keeps most of each: for a caller that says it itself,
    as the audit does of its items (all of one size) in summary.json, the same whether it embeds them or finds
    their embeddings cached."""
    losses = _FitLosses(what, None)
    losses.add([shape], config, times=int(n))
    return [text for _, text in losses.messages()]


def zscore_batch(x: torch.Tensor) -> torch.Tensor:
    """Per-image z-score of (B, H, W) or (B, 1, H, W) float input in float32 (population std; constant ->
    zeros): the convention of the SSIM preset, ``_ssim_common.zscore``."""
    return _zscore(x, x.dim() - 1, dtype=torch.float32)


def preprocess(images: Sequence[np.ndarray], config: ModelConfig) -> torch.Tensor:
    """2D float32 images -> (B, 1, S, S) float32 z-scored network input (size policy, then z-score)."""
    fitted = [fit_size(a, config.input_size, config.size_policy) for a in images]
    t = torch.from_numpy(np.stack(fitted)).unsqueeze(1)
    return zscore_batch(t)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def float_dtype(net: nn.Module) -> torch.dtype:
    """The model's own floating dtype (a .half() or float64 model, an fp16 TorchScript file), for its input:
    float32 input raised torch's "Input type and weight type should be the same"."""
    return next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)


def _probe_width(enc: nn.Module, dev: torch.device) -> None:
    """Set a foreign TorchScript encoder's ``config.emb_dim`` to the width it emits, from one forward pass of
    a blank batch at its input size (its config's 256 is a placeholder: embed had corrected it at the first
    call, so the model's hash, which covers its config, changed under an audit and evaluate refused the very
    object the audit used). A module that fails on the blank batch is left as it is: embed says why."""
    s = enc.config.input_size
    try:
        with torch.no_grad():
            e = forward_batch(enc, torch.zeros((2, 1, s, s), dtype=float_dtype(enc), device=dev))
    except Exception as exc:  # noqa: BLE001 - its own errors come again, named, at embed
        logger.debug("%s: no width probe (%s: %s)", type(enc).__name__, type(exc).__name__, exc)
        return
    if isinstance(e, torch.Tensor) and e.dim() == 2 and e.shape[0] == 2 and e.shape[1] >= 1:
        enc.config.emb_dim = int(e.shape[1])


def checked_embeddings(e: Any, n: int, first: int = 0, *, source: str | None = None) -> torch.Tensor:
    """What a model returned for a batch of ``n`` images (numbered from ``first``), as float32 (n, emb_dim),
    or a ValueError saying what is wrong with it: not a tensor (a foreign model returning a tuple or dict), not
    of a real floating dtype, not (n, emb_dim), NaN/Inf, or an all-zero row (no direction: F.normalize left it
    zero, its cosine with itself 0, so an exact copy could never be found). ``source``: the model's file, which
    the errors name (:func:`model_source`)."""
    at = f"{source}: " if source else ""
    if not isinstance(e, torch.Tensor):
        raise ValueError(f"{at}model returned a {type(e).__name__}, not a tensor of embeddings (batch, emb_dim); "
                         "wrap it so that forward returns the embedding tensor alone")
    if not e.is_floating_point():  # (complex is not floating point either)
        # (e.float() accepted them: bool rows of a sign pattern gave every pair of images a cosine of 1, and
        # complex ones lost their imaginary part with a warning)
        raise ValueError(f"{at}model returned embeddings of dtype {e.dtype}; expected a real floating-point "
                         "tensor (float16/bfloat16/float32/float64)")
    e = e.float()
    if e.dim() != 2 or e.shape[0] != n:
        raise ValueError(f"{at}model returned shape {tuple(e.shape)} for a batch of {n}; expected (batch, emb_dim)")
    if not torch.isfinite(e).all():
        raise ValueError(f"{at}model produced NaN/Inf embeddings for images {first}..{first + n - 1}")
    zero = (e == 0).all(dim=1)
    if bool(zero.any()):
        raise ValueError(f"{at}model produced an all-zero embedding for image {first + int(zero.nonzero()[0])}: "
                         "it has no direction, so its cosine similarity is undefined")
    return e


_MODEL_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_source(net: nn.Module) -> str | None:
    """The file :func:`load_model` read ``net`` from (None for a model built or trained here). Kept beside the
    model, not on it: an attribute would be scripted into the TorchScript file ``save_torchscript`` writes."""
    try:
        return _MODEL_SOURCES.get(net)
    except TypeError:  # (an object that cannot be weakly referenced)
        return None


def embed_batch(net: nn.Module, x: torch.Tensor, first: int = 0) -> torch.Tensor:
    """The checked float32 embeddings (n, emb_dim) of network input ``x`` (images numbered from ``first``):
    :func:`forward_batch`, then :func:`checked_embeddings`; errors name the model's file. A TorchScript
    model's failing forward raises a RuntimeError of the file and the interpreter's last line (its message
    was a 600-character TorchScript traceback without the file's name)."""
    source = model_source(net)
    try:
        out = forward_batch(net, x)
    except RuntimeError as exc:
        if not isinstance(net, (TorchScriptEncoder, torch.jit.ScriptModule)) or isinstance(
                exc, torch.cuda.OutOfMemoryError):
            raise
        last = next((ln.strip() for ln in reversed(str(exc).splitlines()) if ln.strip()), type(exc).__name__)
        n = x.shape[0]
        raise RuntimeError(f"{source or 'TorchScript model'}: its forward failed on images {first}..{first + n - 1} "
                           f"(input {tuple(x.shape)}): {last}") from exc
    return checked_embeddings(out, x.shape[0], first, source=source)


def forward_batch(net: nn.Module, x: torch.Tensor) -> Any:
    """``net(x)``, a batch of one run as two copies: CPU convolutions take another code path for a single image,
    whose embeddings differ in the last bits (1.4e-7) from the same image's in any larger batch, so an image
    embedded alone (a changed file, a resume, the last batch) would not match a fresh run. (What the model
    returns is passed on as it is, sliced to the one row: a tensor, or whatever a foreign model gives.)"""
    if x.shape[0] != 1:
        return net(x)
    out = net(torch.cat([x, x]))
    return out[:1] if isinstance(out, torch.Tensor) else out


def _resolve_model(model: Any) -> nn.Module:
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model: expected a model from build_model/train/load_model or a path, got "
                        f"{type(model).__name__}")
    return model


def embed(images: Any, model: Any, *, batch_size: int = 64, device: str | torch.device | None = None,
          progress: bool = True, policy: Any = None) -> np.ndarray:
    """L2-normalised embeddings, float32 numpy (n, emb_dim), row i for image i (for a list of files: the files
    in the list's order, repeats kept; a folder or glob gives its files sorted, a volume its slices in order).

    ``images``: as :func:`collect_images` (2D arrays, Slices, a stack, or paths; volumes from paths are cut by
    ``policy``). ``model``: from :func:`build_model`, :func:`deepssim_fast.train` or :func:`load_model`, or a
    path for :func:`load_model`. Preprocessing: the model's size policy then per-image z-score (module
    docstring). Batched (``batch_size`` images in memory at a time), no grad, eval mode (restored after).
    """
    from tqdm.auto import tqdm

    if not (isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, (bool, np.bool_))
            and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    net = _resolve_model(model)
    dev = torch.device(device) if device is not None else _model_device(net)
    _check_device(dev)  # (before the images: a device this machine lacks was said after decoding them all)
    arrays, _ = collect_images(images, policy=policy, keep_order=True)
    cfg: ModelConfig = net.config
    with fit_losses_said("images", net) as losses:  # (said before the work, not once per batch)
        losses.add((a.shape for a in arrays), cfg)
    dtype = float_dtype(net)
    lock = _model_lock(net)
    lock.acquire()
    was_training = net.training
    net_dev = _model_device(net)
    # A call that changes the model (train -> eval mode, another device) holds its lock to the end, so that
    # another thread's call on the same model neither runs in train mode (BatchNorm on its batch's statistics,
    # its running averages overwritten) nor restores it under this one; a model in eval mode on its device
    # is only read, by any number of threads at once.
    if not was_training and net_dev == dev:
        lock.release()
        lock = None
    out = np.empty((len(arrays), cfg.emb_dim), dtype=np.float32) if arrays else np.zeros((0, cfg.emb_dim),
                                                                                          np.float32)
    try:
        if net_dev != dev:  # (inside the try: a failed move still restores the model and releases its lock)
            net.to(dev)
        net.eval()
        with torch.no_grad():
            bar = tqdm(total=len(arrays), desc="embed", unit="img", disable=None if progress else True)
            for s in range(0, len(arrays), batch_size):
                x = preprocess(arrays[s:s + batch_size], cfg).to(dev, dtype)
                e = embed_batch(net, x, s)
                if e.shape[1] != out.shape[1]:  # (the config is left as it is: the model's hash covers it)
                    out = _resize_out(out, e.shape[1], s, model_source(net))
                out[s:s + x.shape[0]] = F.normalize(e, dim=1).cpu().numpy()
                bar.update(x.shape[0])
            bar.close()
    finally:
        try:
            net.train(was_training)
            if net_dev != dev:
                net.to(net_dev)
        finally:  # (a failed move back left the lock held: the next embed of the model waited forever)
            if lock is not None:
                lock.release()
    return out


_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(net: nn.Module) -> threading.Lock:
    """One lock per model object (see :func:`embed`)."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(net)
        if lock is None:
            lock = _MODEL_LOCKS[net] = threading.Lock()
        return lock


def _resize_out(out: np.ndarray, dim: int, filled: int, source: str | None = None) -> np.ndarray:
    if filled:
        raise ValueError(f"{source + ': ' if source else ''}model embedding width changed from {out.shape[1]} to "
                         f"{dim} between batches")
    logger.info("model emits %d-dim embeddings (config said %d)", dim, out.shape[1])
    return np.empty((out.shape[0], dim), dtype=np.float32)


def embed_volume(volumes: Any, model: Any, *, policy: Any = None, batch_size: int = 64,
                 device: str | torch.device | None = None, progress: bool = True
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Whole-volume embeddings: (volume embeddings (n_vol, emb_dim), per-volume slice embeddings).

    ``volumes``: one 3D array or a sequence of them. Each is cut into 2D slices by ``policy``
    (:class:`deepssim_fast.data.SlicePolicy`, default axial with the foreground filter); each slice is
    embedded as in :func:`embed`; the volume's embedding is the mean of its L2-normalised slice embeddings,
    L2-normalised again. A volume with no slice left by the policy is an error naming it.
    """
    from .data import volume_slices

    if isinstance(volumes, (str, os.PathLike)):  # (it was iterated: "volume 0: expected a 3D array, got shape ()")
        raise TypeError(f"embed_volume takes arrays, not a path ({os.fspath(volumes)!r}); read the volume first "
                        "(deepssim_fast.io.read_image), or embed the files' slices with embed(path, model)")
    if isinstance(volumes, (np.ndarray, torch.Tensor)) and np.ndim(volumes) < 3:  # (iterated row by row)
        raise ValueError(f"embed_volume takes 3D volumes (or a sequence of them), got one array of shape "
                         f"{tuple(volumes.shape)}; embed 2D images with embed")
    single = isinstance(volumes, (np.ndarray, torch.Tensor)) and np.ndim(volumes) == 3
    vols = [volumes] if single else list(volumes)
    net = _resolve_model(model)
    per: list[np.ndarray] = []
    agg = []
    with fit_losses_said("slices", net):  # (one warning for all the volumes, not one per volume)
        for i, v in enumerate(vols):
            a = _tensor_numpy(v, f"volume {i}") if isinstance(v, torch.Tensor) else np.asarray(v)
            if a.ndim != 3:
                raise ValueError(f"volume {i}: expected a 3D array, got shape {a.shape}")
            if np.issubdtype(a.dtype, np.complexfloating):
                raise TypeError(f"volume {i}: complex dtype {a.dtype}; expected a real-valued volume (pass "
                                f"np.abs(v) or v.real explicitly)")
            if not np.isfinite(a).all():
                raise ValueError(f"volume {i}: contains NaN or Inf values")
            sl = volume_slices(a, policy, source=f"volume{i}")
            if not sl:
                raise ValueError(f"volume {i} of shape {a.shape}: the slice policy left no slice to embed")
            if min(sl[0].array.shape) < MIN_IMAGE_SIDE:  # (named "images[0]", a slice, not the volume)
                raise ValueError(f"volume {i} of shape {a.shape}: its slices along axis {sl[0].axis} are "
                                 f"{sl[0].array.shape[0]} x {sl[0].array.shape[1]}, smaller than the "
                                 f"{MIN_IMAGE_SIDE} pixels a side the encoder takes; cut it along another axis "
                                 "(policy=SlicePolicy(axis=...))")
            e = embed([s.array for s in sl], net, batch_size=batch_size, device=device, progress=progress)
            per.append(e)
            m = e.mean(axis=0)
            n = float(np.linalg.norm(m))
            agg.append(m / n if n > 0 else m)
    dim = per[0].shape[1] if per else int(net.config.emb_dim)
    return (np.stack(agg).astype(np.float32) if agg else np.zeros((0, dim), np.float32)), per


def cosine_pairs(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, d) embedding arrays (float32 (n,))."""
    a = np.asarray(emb_a, dtype=np.float32)
    b = np.asarray(emb_b, dtype=np.float32)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)


def describe(model: nn.Module) -> dict:
    """Small summary for logs and benchmarks: backbone, parameter counts, input size."""
    cfg = getattr(model, "config", None)
    n = sum(p.numel() for p in model.parameters())
    t = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"backbone": getattr(cfg, "backbone", "?"), "params": n, "trainable": t,
            "input_size": getattr(cfg, "input_size", None), "emb_dim": getattr(cfg, "emb_dim", None)}
