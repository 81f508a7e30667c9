"""``check_device``: a device this machine lacks is one DeviceError line, before any model is loaded."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.errors import DeviceError
from clipheads.models.device import check_device


def test_devices_this_machine_has_pass():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")
    assert check_device(None) is None
    if torch.cuda.is_available():
        assert check_device("cuda:0") == torch.device("cuda", 0)


@pytest.mark.parametrize(("device", "message"), [
    ("gpu0", "unknown device 'gpu0'"),
    ("foo", "unknown device 'foo'"),
    ("cuda:99", "'cuda:99' is not available"),
])
def test_devices_this_machine_lacks_are_one_line(device, message):
    with pytest.raises(DeviceError, match=message) as info:
        check_device(device)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_cuda_device():
    with pytest.raises(DeviceError, match="sees no cuda device"):
        check_device("cuda")


def test_the_python_api_checks_before_loading(tmp_path):
    from clipheads.captions import load_captioner
    from clipheads.world.train import TrainConfig, train_clip

    with pytest.raises(DeviceError):
        clipheads.load("a/model-that-would-need-the-network", device="gpu0")
    with pytest.raises(DeviceError):
        load_captioner(tmp_path, device="cuda:99")
    with pytest.raises(DeviceError):
        train_clip(tmp_path / "no-world", tmp_path / "out", TrainConfig(device="gpu0"))
