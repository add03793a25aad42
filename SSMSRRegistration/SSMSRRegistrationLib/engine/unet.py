"""The registration U-Net of the paper (VoxelMorph-style encoder/decoder with skip connections)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .torch_compat import autocast_enabled, cpu_bfloat16_native, cuda_bfloat16_native

#: VoxelMorph's default widths (encoder; decoder, then full-resolution convolutions).
DEFAULT_ENCODER_CHANNELS = (16, 32, 32, 32)
DEFAULT_DECODER_CHANNELS = (32, 32, 32, 32, 32, 16, 16)


def convolve(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 3x3(x3) convolution with stride 1 and padding 1; (N, C, *S) -> (N, C', *S).

    One float32 3D volume on the CPU (N = 1, first spatial axis at least 4) is convolved as its two halves along
    that axis (of an odd axis, two halves overlapping by one row, computed twice), each with a one-voxel halo, in a
    batch of two: the same result up to float rounding. For a batch of one, PyTorch picks its slow
    unfold-and-multiply convolution whenever N*C*D*H <= 20480 (the condition of ``ConvParams::use_mkldnn`` in
    aten/src/ATen/native/Convolution.cpp, PyTorch 2.x), which at the coarse scales is most layers; a batch of two
    goes to oneDNN. Measured on a 2-core AVX2 CPU (Testing/benchmarks/speed.py, ``steps``): a training step 3.8x
    faster on 24x32x24, 1.35x on 48x64x48.
    """
    depth = x.shape[2]
    if (x.dim() != 5 or x.shape[0] != 1 or x.device.type != "cpu" or x.dtype != torch.float32 or depth < 4
            or autocast_enabled("cpu")):
        return conv(x)
    half = (depth + 1) // 2
    padded = F.pad(x, (0, 0, 0, 0, 1, 1))
    slabs = torch.cat([padded[:, :, :half + 2], padded[:, :, depth - half:]])
    y = F.conv3d(slabs, conv.weight, conv.bias, padding=(0, 1, 1))
    return torch.cat([y[:1], y[1:, :, 2 * half - depth:]], dim=2)


class ConvBlock(nn.Module):
    """3x3(x3) convolution + LeakyReLU(0.2)."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.conv = conv(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.activation = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if autocast_enabled(x.device.type) and min(x.shape[2:]) <= 2:
            # Tiny inputs run in float32 (negligible cost): oneDNN's bfloat16 Conv3d weight gradient is
            # non-finite when the first spatial axis has 2 voxels (torch 2.13 CPU, tested in test_registration).
            with torch.autocast(x.device.type, enabled=False):
                return self.activation(self.conv(x.float()))
        return self.activation(convolve(self.conv, x))


class RegistrationUNet(nn.Module):
    """Predicts a displacement field from a (moving, fixed) pair.

    Input (N, 2, *S) (channel 0 moving, channel 1 fixed), any spatial size: each pooling takes the last voxel of an
    odd side alone and each upsampling is cropped to its skip connection's size, so a step costs what S costs (padded
    to a multiple of 16, as before, a 24^3 pair cost as much as a 32^3 one: 0.23 against 0.12 s a step of 7 pairs).
    Sides under 2^len(encoder_channels) (16) are still padded to it, by repeating their last voxel, so that the
    four poolings reach one voxel: unpadded, the 8^3 coarse scale of test_sequences_3d ended 0.94 +- 0.41 mm off over
    five seeds, padded (as now) 0.65 +- 0.21 mm (Testing/benchmarks/RESULTS.md).
    Output (N, ndim, *S): displacement in voxels of the input grid (see ``spatial``).

    Encoder: one strided-by-pooling level per entry of ``encoder_channels``.
    Decoder: the first len(encoder_channels) entries of ``decoder_channels`` are
    convolutions each followed by 2x upsampling and concatenation with the skip
    connection; the remaining entries are full-resolution convolutions.
    The final convolution is initialised near zero (normal, std 1e-5), so an
    untrained network predicts an almost identity transform.

    ``forward(pair, half_resolution=True)`` predicts the field at half the input's resolution with the same weights:
    the network runs on the pair average-pooled by 2 (a side of odd length first padded by its last voxel), and its
    field, in voxels of the input, is upsampled linearly (align_corners False: a half-grid node sits at the centre
    of the 2^ndim voxels it pooled) and cropped to the input's size. The pooled grid gets one node more on each side
    (its last repeated), so the input's last voxel on a side interpolates towards it instead of repeating the last
    node: on the 3D+t benchmark (RESULTS.md) the repeated node gave 1.04 and 0.30 mm for seeds 0 and 1, a next
    node 0.21 and 0.24 mm. A 3D step takes about an eighth of the operations.
    """

    def __init__(self, ndim: int, encoder_channels: Sequence[int] = DEFAULT_ENCODER_CHANNELS,
                 decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        encoder_channels = tuple(int(c) for c in encoder_channels)
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if len(decoder_channels) < len(encoder_channels):
            raise ValueError("decoder_channels needs at least one entry per encoder level")
        self.ndim = ndim
        self.encoder_channels = encoder_channels
        self.decoder_channels = decoder_channels
        self.levels = len(encoder_channels)

        self.encoder = nn.ModuleList()
        skip_channels = [2]
        previous = 2
        for channels in encoder_channels:
            self.encoder.append(ConvBlock(ndim, previous, channels))
            skip_channels.append(channels)
            previous = channels
        # A side of odd length pools its last voxel alone (the same as repeating it), so any size goes through.
        self.pool = nn.MaxPool2d(2, ceil_mode=True) if ndim == 2 else nn.MaxPool3d(2, ceil_mode=True)

        self.decoder = nn.ModuleList()
        skips = list(skip_channels[:-1])
        # The bottom level's output (after the last pooling) feeds the first decoder conv.
        for channels in decoder_channels[: self.levels]:
            self.decoder.append(ConvBlock(ndim, previous, channels))
            previous = channels + skips.pop()
        self.remaining = nn.ModuleList()
        for channels in decoder_channels[self.levels:]:
            self.remaining.append(ConvBlock(ndim, previous, channels))
            previous = channels

        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.flow = conv(previous, ndim, kernel_size=3, padding=1)
        nn.init.normal_(self.flow.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, pair: torch.Tensor, half_resolution: bool = False) -> torch.Tensor:
        size = pair.shape[2:]
        x = pair
        if half_resolution:
            x = (F.avg_pool2d if self.ndim == 2 else F.avg_pool3d)(pad_at_end(x, [n + n % 2 for n in size]), 2)
            x = pad_at_end(x, [n + 1 for n in x.shape[2:]])  # a node past the last, for the upsampling
        x = pad_at_end(x, [max(n, 2 ** self.levels) for n in x.shape[2:]])

        history = [x]
        for block in self.encoder:
            x = self.pool(block(x))
            history.append(x)
        history.pop()  # the bottom level is x itself
        for block in self.decoder:
            skip = history.pop()
            x = torch.cat([crop(F.interpolate(block(x), scale_factor=2, mode="nearest"), skip.shape[2:]), skip], dim=1)
        for block in self.remaining:
            x = block(x)
        flow = convolve(self.flow, x)
        if half_resolution:  # the input's last voxels interpolate towards the node past the last
            flow = F.interpolate(flow, scale_factor=2, mode="bilinear" if self.ndim == 2 else "trilinear",
                                 align_corners=False)
        return crop(flow, size)


def crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *size), the first ``size`` voxels of each side (size <= S)."""
    return x[(slice(None), slice(None)) + tuple(slice(0, n) for n in size)]


def pad_at_end(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *size) (size >= S), each side padded at its end by repeating its last voxel."""
    padding = [p for n, target in zip(reversed(x.shape[2:]), reversed(size)) for p in (0, target - n)]
    return F.pad(x, padding, mode="replicate") if any(padding) else x


def bfloat16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively (CUDA compute >= 8.0, or a CPU with AVX512-BF16/AMX),
    on any torch >= 2.2 (see ``torch_compat``)."""
    if device.type == "cuda":
        return cuda_bfloat16_native(device)
    if device.type == "cpu":
        return cpu_bfloat16_native()
    return False


def _layout(ndim: int) -> torch.memory_format:
    return torch.channels_last_3d if ndim == 3 else torch.channels_last


def use_mixed_precision(network: RegistrationUNet) -> RegistrationUNet:
    """Store the weights channels-last, the layout the bfloat16 convolutions of ``predict`` are fastest in."""
    return network.to(memory_format=_layout(network.ndim))


def predict(network: RegistrationUNet, pair: torch.Tensor, mixed_precision: bool = False,
            half_resolution: bool = False) -> torch.Tensor:
    """(N, 2, *S) pair -> (N, ndim, *S) float32 field in voxels (predicted at half resolution with
    ``half_resolution``, see ``RegistrationUNet``).

    With ``mixed_precision`` the convolutions run in bfloat16 on channels-last tensors (weights and Adam
    state stay float32, the field is returned in float32); without it, a float32 forward pass, channels-last for a
    batch of volumes on the CPU (a training step on 3 pairs of 32x40x32 1.3x faster with AVX2 only, 1.5x with
    AVX-512; one volume stays as it is, for ``convolve``'s halves: Testing/benchmarks/RESULTS.md "float32").
    """
    if not mixed_precision:
        if pair.dim() == 5 and pair.shape[0] > 1 and pair.device.type == "cpu":
            return network(pair.contiguous(memory_format=_layout(3)), half_resolution).contiguous()
        return network(pair, half_resolution)
    with torch.autocast(pair.device.type, dtype=torch.bfloat16):
        return network(pair.contiguous(memory_format=_layout(network.ndim)), half_resolution).float()

