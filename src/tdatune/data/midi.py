"""A minimal Standard MIDI File reader (formats 0 and 1) giving notes in seconds.

Handles running status, note-off as note-on with velocity 0, tempo changes (a tempo map
shared by all tracks, as in format 1), meta and sysex events. Sustain pedal and other
controllers are ignored. SMPTE time division is rejected with a clear error.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Note:
    """One sounded note: start and end in seconds, MIDI pitch 0..127, velocity 1..127."""

    start: float
    end: float
    pitch: int
    velocity: int


class MidiError(ValueError):
    """A file that is not a well-formed Standard MIDI File."""


def _varlen(data: bytes, pos: int, path: Path) -> tuple[int, int]:
    value = 0
    for _ in range(4):
        if pos >= len(data):
            raise MidiError(f"{path}: variable-length number runs past the end of a track")
        byte = data[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos
    raise MidiError(f"{path}: variable-length number longer than 4 bytes")


def _chunks(data: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 0
    while pos + 8 <= len(data):
        kind, length = data[pos : pos + 4], struct.unpack(">I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise MidiError(f"{path}: chunk {kind!r} says {length} bytes but only {len(body)} remain")
        chunks.append((kind, body))
        pos += 8 + length
    return chunks


def _track_events(body: bytes, path: Path) -> list[tuple[int, str, tuple[int, ...]]]:
    """(absolute tick, kind, values) for note on/off and tempo events of one track."""
    events: list[tuple[int, str, tuple[int, ...]]] = []
    pos, tick, status = 0, 0, 0
    while pos < len(body):
        delta, pos = _varlen(body, pos, path)
        tick += delta
        if pos >= len(body):
            raise MidiError(f"{path}: track ends inside an event")
        byte = body[pos]
        if byte == 0xFF:  # meta event
            if pos + 2 > len(body):
                raise MidiError(f"{path}: truncated meta event")
            meta_type = body[pos + 1]
            length, pos = _varlen(body, pos + 2, path)
            payload = body[pos : pos + length]
            pos += length
            if meta_type == 0x51 and length == 3:
                events.append((tick, "tempo", (int.from_bytes(payload, "big"),)))
            elif meta_type == 0x2F:
                break
            continue
        if byte in (0xF0, 0xF7):  # sysex
            length, pos = _varlen(body, pos + 1, path)
            pos += length
            continue
        if byte & 0x80:
            status = byte
            pos += 1
        elif status == 0:
            raise MidiError(f"{path}: data byte {byte:#04x} with no running status")
        kind = status & 0xF0
        size = 1 if kind in (0xC0, 0xD0) else 2
        values = tuple(body[pos : pos + size])
        if len(values) != size:
            raise MidiError(f"{path}: truncated channel event")
        pos += size
        channel = status & 0x0F
        if kind == 0x90 and values[1] > 0:
            events.append((tick, "on", (channel, values[0], values[1])))
        elif kind == 0x80 or kind == 0x90:
            events.append((tick, "off", (channel, values[0])))
    return events


def read_midi(path: str | os.PathLike[str]) -> list[Note]:
    """All notes of a MIDI file, sorted by start time then pitch."""
    path = Path(path)
    data = path.read_bytes()
    if data[:4] != b"MThd":
        raise MidiError(f"{path} is not a MIDI file (no MThd header)")
    chunks = _chunks(data, path)
    header = chunks[0][1]
    if len(header) < 6:
        raise MidiError(f"{path}: MThd header too short")
    fmt, ntracks, division = struct.unpack(">HHH", header[:6])
    if fmt not in (0, 1):
        raise MidiError(f"{path}: MIDI format {fmt} is not supported (only 0 and 1)")
    if division & 0x8000:
        raise MidiError(f"{path}: SMPTE time division is not supported (only ticks per quarter)")
    tracks = [body for kind, body in chunks[1:] if kind == b"MTrk"]
    if len(tracks) != ntracks:
        raise MidiError(f"{path}: header announces {ntracks} tracks, found {len(tracks)}")
    per_track = [_track_events(t, path) for t in tracks]
    tempo_map = sorted((tick, vals[0]) for evs in per_track for tick, kind, vals in evs
                       if kind == "tempo")
    seconds = _tick_clock(tempo_map, division)
    notes: list[Note] = []
    for evs in per_track:
        open_notes: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for tick, kind, vals in sorted(evs, key=lambda e: (e[0], e[1] != "off")):
            if kind == "on":
                open_notes.setdefault((vals[0], vals[1]), []).append((tick, vals[2]))
            elif kind == "off" and open_notes.get((vals[0], vals[1])):
                start, vel = open_notes[(vals[0], vals[1])].pop(0)
                if tick > start:
                    notes.append(Note(seconds(start), seconds(tick), vals[1], vel))
    return sorted(notes, key=lambda n: (n.start, n.pitch, n.end))


def _tick_clock(tempo_map: list[tuple[int, int]], division: int):
    """A function from absolute tick to seconds under the tempo map (default 120 bpm)."""
    segments = [(0, 0.0, 500_000)]  # (start tick, start seconds, microseconds per quarter)
    for tick, tempo in tempo_map:
        t0, s0, cur = segments[-1]
        segments.append((tick, s0 + (tick - t0) * cur / 1e6 / division, tempo))

    def seconds(tick: int) -> float:
        for t0, s0, cur in reversed(segments):
            if tick >= t0:
                return s0 + (tick - t0) * cur / 1e6 / division
        return 0.0

    return seconds
