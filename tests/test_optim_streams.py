"""Stream discipline of the optimizer's host-side read of a device skip flag (lwkd_fast/optim.py,
_Unsettled), checked without a GPU: the torch.cuda calls it makes are recorded by stand-ins."""

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
