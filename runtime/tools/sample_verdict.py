"""Valid verdicts without a model, for exercising MQTT: the tests' and the MQTT benchmark's."""

from __future__ import annotations

import time

from patchline.runtime.decision import Decision
from patchline.runtime.verdict import make_verdict

CAMERA = "cam1"


def sample_verdict(seq: int, part_id: str | None = None, camera: str = CAMERA) -> dict:
    """A valid verdict whose score varies with ``seq`` (odd seqs are NG)."""
    ng = seq % 2 == 1
    decision = Decision(score=1.0 + (0.25 if ng else -0.25) + seq / 1000, normalised=0.75 if ng else 0.25,
                        threshold=1.0, verdict="NG" if ng else "OK")
    return make_verdict(camera=camera, seq=seq, timestamp=time.time(), frame_age_s=0.004, decision=decision,
                        location=(seq % 200, 17), latency_ms={"preprocess": 1.25, "backbone": 6.5, "total": 9.0},
                        model_id="test-model", artifact_checksum="ab" * 32, part_id=part_id,
                        evidence=f"/var/lib/patchline/evidence/{seq}.png" if ng else None)
