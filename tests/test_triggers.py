"""Trigger mode's pairing of triggers and frames, on a real live GStreamer source at 10 fps.

The model is not involved: "busy" is a loop that does not ask for the next trigger, as the daemon's frame
loop does not while it inspects. The daemon end to end, with a slow model, is in test_daemon.py.
"""

from __future__ import annotations

import time

from pydantic import TypeAdapter

from patchline.runtime.sources import SourceConfig, open_source
from patchline.runtime.triggers import Trigger, TriggeredFrames
from tests.conftest import needs_gstreamer

pytestmark = needs_gstreamer  # every test here runs a live GStreamer source
FRAME_S = 0.1


def live(frames: int) -> TriggeredFrames:
    """A 10 fps live test source that delivers ``frames`` frames, then none (it reconnects only after a minute)."""
    config = TypeAdapter(SourceConfig).validate_python({
        "kind": "gstreamer", "at_end": "reconnect", "reconnect_min_s": 60, "reconnect_max_s": 60,
        "pipeline": f"videotestsrc is-live=true num-buffers={frames} ! video/x-raw,width=64,height=48,framerate=10/1"})
    return TriggeredFrames(open_source(config), timeout_s=1.0, max_pending=3)


def trigger(part_id: str) -> tuple[Trigger, float]:
    return Trigger(part_id, time.time()), time.monotonic()


def test_each_trigger_keeps_the_first_frame_after_it_while_the_model_is_busy():
    frames = live(100)
    frames.start()
    try:
        while frames.source.counters.frames < 3:
            time.sleep(0.05)
        sent = []
        for index in range(3):  # three triggers 100 ms apart while nothing takes them
            sent.append(trigger(f"P-{index}"))
            assert frames.add(*sent[-1]) is None
            time.sleep(FRAME_S)
        assert frames.add(*trigger("P-3")) == ("too_many_triggers", "3 triggers already waiting for a frame")
        time.sleep(0.5)  # busy on something else; frames go on arriving
        taken = [frames.take(1.0)[0] for _ in sent]
        for (sent_trigger, arrived), waiting in zip(sent, taken):
            assert waiting.trigger is sent_trigger
            assert 0 <= waiting.frame.monotonic - arrived < FRAME_S + 0.01  # the first frame at or after it
        assert len({w.frame.index for w in taken}) == 3

        # A trigger registered after its frame was read (the network is slower than the camera): the ring has it.
        late, arrived = trigger("RING")
        time.sleep(0.25)
        assert frames.add(late, arrived) is None
        waiting, _ = frames.take(0.01)
        assert waiting.trigger is late and 0 <= waiting.frame.monotonic - arrived < FRAME_S + 0.01
    finally:
        frames.stop()
        frames.source.close()


def test_a_trigger_given_up_is_told_the_truth_model_busy_or_no_frame():
    frames = live(15)  # 1.5 s of frames, then the camera delivers nothing
    frames.start()
    try:
        while frames.source.counters.frames < 1:
            time.sleep(0.05)
        assert frames.add(*trigger("BUSY")) is None
        time.sleep(1.2)  # longer than timeout_s: the model never got to it, though its frame came
        waiting, given_up = frames.take(0.1)
        assert waiting is None and [(g.trigger.part_id, reason) for g, reason, _ in given_up] == [("BUSY", "model_busy")]
        detail = given_up[0][2]
        assert "its frame was captured" in detail and "ms after the trigger, but the model was busy" in detail

        while frames.source.counters.frames < 15:
            time.sleep(0.05)
        time.sleep(0.3)
        assert frames.add(*trigger("LATE")) is None
        waiting, given_up = None, []
        deadline = time.monotonic() + 3
        while not given_up and time.monotonic() < deadline:
            waiting, given_up = frames.take(0.5)
        assert waiting is None
        assert [(g.trigger.part_id, reason, detail) for g, reason, detail in given_up] == [
            ("LATE", "no_frame", "no frame captured within 1 s after the trigger")]
    finally:
        left = frames.stop()
        frames.source.close()
    assert left == [] and frames.add(*trigger("AFTER")) == ("stopping", "the daemon is stopping; trigger not inspected")
