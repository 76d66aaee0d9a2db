"""Stream discipline of the optimizer's host-side read of a device skip flag
(lwkd_fast/optim/skipping.py, _Unsettled), checked without a GPU: the torch.cuda calls it makes are recorded by stand-ins."""

from __future__ import annotations

import types

import torch

from lwkd_fast import optim


class _Recorder:
    def __init__(self):
        self.calls = []


def test_flag_copy_and_its_event_share_the_stream_of_the_flags_device(monkeypatch):
    """The pinned copy of the flag runs on the current stream of the flag's device; the event
    that says when the copy is done must be recorded on that same stream even when the flag's
    device is not the current device (an optimizer on cuda:1 while cuda:0 is current)."""
    rec = _Recorder()
    current = {"device": 0}

    class HostFlag:
        def copy_(self, src, non_blocking=False):
            rec.calls.append(("copy", src.device.index, non_blocking))
            return self

    class Event:
        def record(self, stream=None):
            rec.calls.append(("record", stream if stream is not None else f"stream-of-{current['device']}"))

        def query(self):
            return False

    monkeypatch.setattr(optim, "_EAGER_HOST_READ", True)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: HostFlag() if k.get("pin_memory") else torch.zeros(*a))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream-of-{torch.device(device).index}")
    flag = types.SimpleNamespace(device=torch.device("cuda", 1))
    optim._Unsettled(flag)
    assert rec.calls == [("copy", 1, True), ("record", "stream-of-1")]


def test_cpu_tensor_rates_stay_on_the_host_for_a_device_optimizer():
    """A base rate held in a CPU 0-dim tensor (a scheduler writing into it) is read by every rule
    backend on the host; the optimizer must not copy it to its device with a blocking copy at
    every step (on CUDA a pageable host-to-device copy waits for the host)."""
    p = torch.zeros(3, requires_grad=True)
    opt = optim.LayerwiseSGD([{"params": [p], "layer": 0, "lr": torch.tensor(0.1)}], lr=0.1)
    opt._device = torch.device("meta")  # stands in for an accelerator: any copy would land there
    _, lr_t = opt._layer_base_lrs()
    assert lr_t.device.type == "cpu" and lr_t.tolist() == [float(torch.tensor(0.1))]
