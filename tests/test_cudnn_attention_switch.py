"""Streaming turns cuDNN attention off process-wide (it blocks the host); the count of streaming models
brings the user's own setting back only when the last one lets go, in any order."""
from __future__ import annotations

import pytest
import torch

from offload.streaming import _CudnnAttentionOff


@pytest.fixture
def cudnn_setting():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("users_setting", [True, False])
def test_the_setting_returns_when_the_last_holder_drops(cudnn_setting, users_setting):
    torch.backends.cuda.enable_cudnn_sdp(users_setting)
    _CudnnAttentionOff.hold()
    _CudnnAttentionOff.hold()  # a second streaming model, built while the first is open
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    _CudnnAttentionOff.drop()  # the first closes: the second still streams
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    _CudnnAttentionOff.drop()
    assert torch.backends.cuda.cudnn_sdp_enabled() == users_setting
    assert _CudnnAttentionOff.holders == 0
