"""What a GPU offers our kernels' launch configs: its capability and its shared memory per program.

The launchers ask ``device_limits(device)``; their config choosers (``attention.launch_config``,
``scoring.scores_config``) take the limits as an argument, so tests, offline builds and benchmarks
can ask what another card would get (``limits_for(89)``) or force that card's configs on a bigger
one.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

# Shared memory one thread block may opt into, per compute capability (bytes; CUDA's
# sharedMemPerBlockOptin). Consumer Ampere/Ada/Blackwell (86, 89, 120) have 99 KB, A100 163 KB,
# Hopper 227 KB.
SHARED_MEMORY_PER_BLOCK = {
    80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376,
}


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    capability: int  # major * 10 + minor, as in sm_89
    shared_memory: int  # bytes of shared memory one program may use

    @property
    def tma(self) -> bool:
        """Tiles may be copied by TMA (tensor descriptors): sm_90 and later."""
        return self.capability >= 90


def limits_for(capability: int) -> DeviceLimits:
    """The limits of a card of this capability, from the table (for offline builds, and for cards
    whose driver does not report the opt-in limit); an unknown capability gets the smallest
    shared memory of the table, so that a config never asks for more than the card has."""
    shared = SHARED_MEMORY_PER_BLOCK.get(capability, min(SHARED_MEMORY_PER_BLOCK.values()))
    return DeviceLimits(capability, shared)


# Off CUDA only Triton's interpreter runs the kernels: it emulates tensor descriptors and has no
# shared memory to run out of, so it runs Hopper's configs (CI tests those).
INTERPRETER = limits_for(90)


def device_limits(device: torch.device) -> DeviceLimits:
    """(capability, shared memory per block) of ``device``: the opt-in per-block limit that
    ``torch.cuda.get_device_properties`` reports as ``shared_memory_per_block_optin`` (torch >= 2.6;
    the table where a build lacks it). Not a CUDA device: ``INTERPRETER``."""
    if device.type != "cuda":
        return INTERPRETER
    return _cuda_limits(torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device()))


@functools.cache
def _cuda_limits(device: torch.device) -> DeviceLimits:
    props = torch.cuda.get_device_properties(device)
    capability = props.major * 10 + props.minor
    shared = getattr(props, "shared_memory_per_block_optin", 0) or limits_for(capability).shared_memory
    return DeviceLimits(capability, shared)
