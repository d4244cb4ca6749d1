"""A convolutional patch stem and the small ViTs built on it, registered with timm.

A stack of stride-2 3×3 convolutions instead of one patchify convolution (Xiao et al., "Early
Convolutions Help Transformers See Better", 2021) makes a small ViT learn from scratch much faster,
which is what the embedded cluttered-digits experiment needs on a CPU. The model stays a timm
``VisionTransformer``, so everything built for ViTs (DynamicViT, FLOPs, reducers) applies unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer
from torch import nn


class ConvStemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with ``proj`` replaced by log2(patch) stride-2 conv-BN-ReLU stages + a 1×1 conv.

    Channels double per stage up to ``embed_dim / 2``; the output grid equals the patchify grid.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        patch = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or patch & (patch - 1):
            raise ValueError(f"ConvStemPatchEmbed needs a square power-of-two patch size, got {self.patch_size}")
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        layers: list[nn.Module] = []
        width = max(16, embed_dim // 2 ** int(math.log2(patch)))
        for _ in range(int(math.log2(patch))):
            layers += [nn.Conv2d(in_chans, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            in_chans, width = width, min(width * 2, embed_dim)
        layers.append(nn.Conv2d(in_chans, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.in_chans = self.proj[0].in_channels


class StemPatchify(nn.Module):
    """A fixed stride-2**stages conv stem, then one patchify convolution of kernel = stride = patch / 2**stages.

    The ``proj`` of :class:`StemPatchEmbed`. ``padding`` pads the image on each side before the stem, as a
    patchify ``nn.Conv2d``'s own ``padding`` pads its input, so a DVT exit (:mod:`dynvit.models.dvt`) that
    reaches its grid through padding sets it the same way on either.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch: int, stages: int = 2, width: int = 16) -> None:
        super().__init__()
        stride = 2**stages
        if patch % stride:
            raise ValueError(f"the patch size must be a multiple of the stem's stride {stride}, got {patch}")
        layers: list[nn.Module] = []
        for _ in range(stages):
            layers += [nn.Conv2d(in_chans, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            in_chans, width = width, width * 2
        self.stem = nn.Sequential(*layers)
        self.patchify = nn.Conv2d(in_chans, embed_dim, patch // stride, patch // stride)
        self.padding: tuple[int, int] = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.padding):
            x = F.pad(x, (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        return self.patchify(self.stem(x))


class StemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with ``proj`` a :class:`StemPatchify`: two stride-2 conv-BN-ReLU stages and one
    patchify convolution, so the patch can be any multiple of 4 px (a DVT cascade's 16, 12 and 8 px exits)
    and a small ViT still learns from scratch as fast as on :class:`ConvStemPatchEmbed`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"StemPatchEmbed needs a square patch, got {self.patch_size}")
        self.in_chans = self.proj.in_channels
        self.proj = StemPatchify(self.in_chans, self.proj.out_channels, self.patch_size[0])


# timm looks up a model's default config (input size, normalisation) here when it is registered.
default_cfgs = generate_default_cfgs(
    {
        name: dict(num_classes=10, input_size=(1, 64, 64), mean=(0.0,), std=(1.0,), crop_pct=1.0)
        for name in ("vit_digits.untrained", "vit_digits_exit.untrained")
    }
)


@register_model
def vit_digits(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """6 × 128 ViT with a conv stem for 64×64 one-channel images (8×8 = 64 patch tokens of 8 px)."""
    args = dict(
        img_size=64,
        patch_size=8,
        in_chans=1,
        embed_dim=128,
        depth=6,
        num_heads=4,
        mlp_ratio=3.0,
        embed_layer=ConvStemPatchEmbed,
        num_classes=10,
    )
    return _create_vision_transformer("vit_digits", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vit_digits_exit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """4 × 128 ViT on a stride-4 conv stem (:class:`StemPatchEmbed`) for 64×64 one-channel images: the exits
    of the digits DVT cascade (experiments/digits_dvt.yaml), patch 16, 12 (image padded by 4) and 8 px."""
    args = dict(
        img_size=64,
        patch_size=8,
        in_chans=1,
        embed_dim=128,
        depth=4,
        num_heads=4,
        mlp_ratio=3.0,
        embed_layer=StemPatchEmbed,
        num_classes=10,
    )
    return _create_vision_transformer("vit_digits_exit", pretrained=pretrained, **dict(args, **kwargs))
