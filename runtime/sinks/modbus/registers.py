"""The register map every camera's unit id serves: one place for the addresses, the codes and the encodings; the
README's table is ``markdown_table()`` (tests/test_modbus.py checks that they agree).

Everything is a holding register (function codes 3 read, 6 and 16 write; 4 reads the same addresses), because many
PLCs speak nothing else. A flag is a register holding 0 or 1; the coils and discrete inputs (1, 2, 5, 15) are the
bits of the registers, coil ``16 * register + bit``, so a flag is also the coil at 16 × its address.

32-bit values take two registers, the high word first (big-endian word order, Modbus's common default; in a
Siemens S7 a DINT, in TIA's MB_CLIENT as it comes; a Rockwell PLC swaps the words). Signed values are two's
complement. Addresses are the protocol's, from 0 (holding register 40001 in the 1-based notation is address 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# -- inputs: the PLC writes ----------------------------------------------------------------------
TRIGGER = 0  # 0 → 1 starts a handshake; back to 0 acknowledges its done (only 0 and 1 are accepted)
PART_ID = 1  # uint32, 2 registers: the part id the next trigger carries; 0 is no part id and refused
WRITABLE = range(TRIGGER, PART_ID + 2)

# -- the handshake and the camera ----------------------------------------------------------------
BUSY = 10  # 1 while patchline owes an answer to a trigger of this unit
DONE = 11  # 1 once the trigger result is written, until the PLC sets TRIGGER back to 0
CAMERA_STATE = 12  # STATE_* below
HEARTBEAT = 13  # counts up (wrapping at 65535) every heartbeat_s while the camera runs
WRITE_ERROR = 14  # the ERRORS code of the last write refused with an exception
WRITES_REFUSED = 15  # refused writes since start, wrapping at 65535
MODEL_HASH = 16  # uint32, 2 registers: the first 8 hex digits of the running model's artifact checksum
MODEL_ID = 18  # the running model's id, ASCII, 2 characters a register (high byte first), 0-padded
MODEL_ID_REGISTERS = 16

# -- results: the same layout twice ----------------------------------------------------------------
TRIGGER_RESULT = 40  # the answer to this unit's own trigger; stays as it is while DONE is 1
LATEST_RESULT = 60  # every verdict of the camera (continuous mode, other protocols' triggers), the newest
# offsets within a result
R_ERROR = 0  # ERRORS code; 0: a verdict
R_OK = 1  # 1: verdict OK
R_NG = 2  # 1: verdict NG (OK and NG both 0: no verdict, see R_ERROR)
R_SEQ = 3  # uint32: the verdict's seq (the same as MQTT's); 0 without a verdict
R_PART_ID = 5  # uint32: the part id, when it is a number that fits; else 0
R_SCORE = 7  # int32: score × 1000
R_NORMALISED = 9  # int32: normalised score × 1000; NONE without calibration bounds
R_THRESHOLD = 11  # int32: threshold × 1000
R_X = 13  # the most anomalous patch, pixels of the camera's image
R_Y = 14
R_MODEL_HASH = 15  # uint32: the model that judged (as MODEL_HASH)
RESULT_REGISTERS = 20
REGISTERS = LATEST_RESULT + RESULT_REGISTERS  # every address below this is served

STATE_OFFLINE, STATE_ONLINE, STATE_STOPPED = 0, 1, 2
STATES = {"offline": STATE_OFFLINE, "online": STATE_ONLINE, "stopped": STATE_STOPPED}

INT32_MAX = 2**31 - 1
NONE = -(2**31)  # an int32 field without a value
SCALE = 1000

# error codes: in a result's R_ERROR (the camera's answer to a trigger) and in WRITE_ERROR (a refused write)
ERRORS = {
    "ok": 0,
    "concurrent_trigger": 1,  # a trigger while BUSY: refused, this unit still owes an answer to an earlier one
    "not_in_trigger_mode": 2,
    "no_frame": 3,
    "model_busy": 4,
    "too_many_triggers": 5,
    "stopping": 6,
    "non_finite_score": 7,
    "not_published": 8,
    "invalid_part_id": 9,  # TRIGGER set while PART_ID is 0
    "out_of_range": 10,  # a value outside what the register takes (TRIGGER = 7)
    "read_only": 11,  # a write to an address the PLC does not write, or a coil other than the trigger's
    "other": 99,  # a code of the camera's this map does not know (the log names it)
}


@dataclass(frozen=True)
class Field:
    name: str
    address: int
    count: int
    kind: str
    access: str
    meaning: str


def _result_fields(base: int, which: str) -> list[Field]:
    return [
        Field(f"{which} error", base + R_ERROR, 1, "uint16", "read", "error code (table below); 0: a verdict"),
        Field(f"{which} OK", base + R_OK, 1, "flag", "read", "1: verdict OK"),
        Field(f"{which} NG", base + R_NG, 1, "flag", "read", "1: verdict NG"),
        Field(f"{which} seq", base + R_SEQ, 2, "uint32", "read", "the verdict's seq (as on MQTT); 0: none"),
        Field(f"{which} part id", base + R_PART_ID, 2, "uint32", "read", "the verdict's part id; 0: none or not a number"),
        Field(f"{which} score", base + R_SCORE, 2, "int32", "read", "score × 1000; -2147483648: none"),
        Field(f"{which} normalised score", base + R_NORMALISED, 2, "int32", "read",
              "normalised score × 1000; -2147483648: none"),
        Field(f"{which} threshold", base + R_THRESHOLD, 2, "int32", "read", "threshold × 1000; -2147483648: none"),
        Field(f"{which} x", base + R_X, 1, "uint16", "read", "most anomalous patch, x (pixels)"),
        Field(f"{which} y", base + R_Y, 1, "uint16", "read", "most anomalous patch, y (pixels)"),
        Field(f"{which} model hash", base + R_MODEL_HASH, 2, "uint32", "read", "the model that judged (as model hash)"),
    ]


FIELDS = [
    Field("trigger", TRIGGER, 1, "flag", "write", "0 → 1: inspect the next frame; 1 → 0: acknowledge done"),
    Field("part id", PART_ID, 2, "uint32", "write", "the part id the trigger carries; 0 is refused"),
    Field("busy", BUSY, 1, "flag", "read", "1: an answer to this unit's trigger is owed"),
    Field("done", DONE, 1, "flag", "read", "1: the trigger result is written; until trigger is 0"),
    Field("camera state", CAMERA_STATE, 1, "uint16", "read", "0 offline, 1 online, 2 stopped"),
    Field("heartbeat", HEARTBEAT, 1, "uint16", "read", "counts up every heartbeat_s while the camera runs"),
    Field("write error", WRITE_ERROR, 1, "uint16", "read", "error code of the last refused write"),
    Field("writes refused", WRITES_REFUSED, 1, "uint16", "read", "refused writes since start (wraps)"),
    Field("model hash", MODEL_HASH, 2, "uint32", "read", "first 8 hex digits of the artifact checksum"),
    Field("model id", MODEL_ID, MODEL_ID_REGISTERS, "ASCII", "read", "model id, 2 characters a register, 0-padded"),
    *_result_fields(TRIGGER_RESULT, "trigger result:"),
    *_result_fields(LATEST_RESULT, "latest result:"),
]


def markdown_table() -> str:
    """The register map as the README shows it."""
    rows = ["| address | coil | registers | type | PLC | meaning |", "|---|---|---|---|---|---|"]
    for f in FIELDS:
        coil = str(16 * f.address) if f.kind == "flag" else ""
        rows.append(f"| {f.address} | {coil} | {f.count} | {f.kind} | {f.access} | {f.name}: {f.meaning} |")
    return "\n".join(rows)


# -- encodings -----------------------------------------------------------------------------------

def u32(value: int) -> list[int]:
    """An unsigned 32-bit value as two registers, high word first."""
    return [(value >> 16) & 0xFFFF, value & 0xFFFF]


def i32(value: int) -> list[int]:
    """A signed 32-bit value (two's complement) as two registers, high word first."""
    return u32(value & 0xFFFFFFFF)


def decode_u32(words: list[int]) -> int:
    return (words[0] << 16) | words[1]


def decode_i32(words: list[int]) -> int:
    value = decode_u32(words)
    return value - 2**32 if value >= 2**31 else value


def scaled(value: float | None) -> int:
    """``value`` × 1000 as an int32, rounded to the nearest; beyond ±2147483.647 clamped to the nearest end
    (NONE stays reserved for a value that is missing)."""
    if value is None:
        return NONE
    if not math.isfinite(value):  # make_verdict refuses these; a model's hand-made state might not
        return NONE
    return max(-INT32_MAX, min(INT32_MAX, round(value * SCALE)))


def ascii_registers(text: str, registers: int) -> list[int]:
    """``text`` as ASCII (others become '?'), two characters a register, high byte first, cut and 0-padded."""
    data = text.encode("ascii", "replace")[:2 * registers].ljust(2 * registers, b"\0")
    return [(data[i] << 8) | data[i + 1] for i in range(0, len(data), 2)]


def decode_ascii(words: list[int]) -> str:
    return b"".join(bytes([w >> 8, w & 0xFF]) for w in words).rstrip(b"\0").decode("ascii")


def checksum_hash(checksum: str | None) -> int:
    """The first 8 hex digits of an artifact's checksum (sha256, hex) as a uint32; 0 when there is none."""
    try:
        return int((checksum or "")[:8], 16)
    except ValueError:
        return 0


def part_id_number(part_id: str | None) -> int:
    """A part id as the uint32 the result registers carry: the number it is, or 0 (none, or not a uint32)."""
    if part_id is None or not part_id.isdigit() or not part_id.isascii():
        return 0
    value = int(part_id)
    return value if value <= 0xFFFFFFFF else 0


def result(verdict: dict) -> list[int]:
    """A verdict (make_verdict's) as a result's registers."""
    words = [0] * RESULT_REGISTERS
    words[R_OK] = int(verdict["verdict"] == "OK")
    words[R_NG] = int(verdict["verdict"] == "NG")
    words[R_SEQ:R_SEQ + 2] = u32(verdict["seq"] & 0xFFFFFFFF)
    words[R_PART_ID:R_PART_ID + 2] = u32(part_id_number(verdict.get("part_id")))
    words[R_SCORE:R_SCORE + 2] = i32(scaled(verdict["score"]))
    words[R_NORMALISED:R_NORMALISED + 2] = i32(scaled(verdict.get("normalised_score")))
    words[R_THRESHOLD:R_THRESHOLD + 2] = i32(scaled(verdict["threshold"]))
    location = verdict.get("location") or {}
    words[R_X] = min(0xFFFF, max(0, int(location.get("x", 0))))
    words[R_Y] = min(0xFFFF, max(0, int(location.get("y", 0))))
    words[R_MODEL_HASH:R_MODEL_HASH + 2] = u32(checksum_hash(verdict.get("artifact_checksum")))
    return words


def error_result(code: str, part_id: str | None) -> tuple[list[int], bool]:
    """A result that is an error (``code``: the camera's, or this map's); and whether the code is one this map
    knows (an unknown one becomes ``other``)."""
    words = [0] * RESULT_REGISTERS
    known = code in ERRORS
    words[R_ERROR] = ERRORS[code] if known else ERRORS["other"]
    for field in (R_SCORE, R_NORMALISED, R_THRESHOLD):
        words[field:field + 2] = i32(NONE)
    words[R_PART_ID:R_PART_ID + 2] = u32(part_id_number(part_id))
    return words, known
