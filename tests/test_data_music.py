"""MIDI reader on files written byte by byte, event encoding, MAESTRO folders, chorale stand-in."""

from __future__ import annotations

import pytest
import torch

from data_writers import midi_file, midi_track, varlen
from tdatune.data.midi import MidiError, Note, read_midi
from tdatune.data.music import (
    NOTE_OFF,
    TIME_SHIFT,
    VELOCITY,
    VOCAB_SIZE,
    encode_notes,
    load_music_splits,
    midi_files,
)
from tdatune.data.text import make_blocks


def sample_midi() -> bytes:
    """Format 1: a tempo track (60 bpm, then 120 bpm from tick 960) and a note track using
    running status, note-on with velocity 0 as note-off, a program change and a sysex."""
    tempo = midi_track([
        varlen(0) + b"\xff\x51\x03" + (1_000_000).to_bytes(3, "big"),
        varlen(960) + b"\xff\x51\x03" + (500_000).to_bytes(3, "big"),
    ])
    notes = midi_track([
        varlen(0) + b"\xc0\x00",                 # program change (one data byte)
        varlen(0) + b"\xf0\x03\x7e\x7f\xf7",     # sysex
        varlen(0) + b"\x90\x3c\x64",             # on 60 vel 100
        varlen(0) + b"\x40\x50",                 # running status: on 64 vel 80
        varlen(480) + b"\x3c\x00",               # on 60 vel 0 = off
        varlen(480) + b"\x80\x40\x00",           # off 64
        varlen(480) + b"\x90\x43\x5a",           # on 67 vel 90 (after the tempo change)
        varlen(480) + b"\x43\x00",               # off 67
    ])
    return midi_file([tempo, notes], division=480)


def test_read_midi_equals_written(tmp_path):
    (tmp_path / "a.mid").write_bytes(sample_midi())
    notes = read_midi(tmp_path / "a.mid")
    assert notes == [Note(0.0, 1.0, 60, 100), Note(0.0, 2.0, 64, 80), Note(2.5, 3.0, 67, 90)]


def test_read_midi_rejects_malformed(tmp_path):
    (tmp_path / "x.mid").write_bytes(b"RIFF....")
    with pytest.raises(MidiError, match="no MThd"):
        read_midi(tmp_path / "x.mid")
    data = sample_midi()
    (tmp_path / "cut.mid").write_bytes(data[:-6])
    with pytest.raises(MidiError, match="chunk"):
        read_midi(tmp_path / "cut.mid")
    smpte = midi_file([midi_track([])], division=0xE728)
    (tmp_path / "smpte.mid").write_bytes(smpte)
    with pytest.raises(MidiError, match="SMPTE"):
        read_midi(tmp_path / "smpte.mid")


def test_encode_notes_events():
    notes = [Note(0.0, 1.0, 60, 100), Note(0.0, 2.0, 64, 80), Note(2.5, 3.0, 67, 90)]
    assert encode_notes(notes) == [
        VELOCITY + 25, 60, VELOCITY + 20, 64, TIME_SHIFT + 99, NOTE_OFF + 60,
        TIME_SHIFT + 99, NOTE_OFF + 64, TIME_SHIFT + 49, VELOCITY + 22, 67, TIME_SHIFT + 49,
        NOTE_OFF + 67,
    ]
    assert max(encode_notes([Note(0.0, 5.0, 127, 127)])) < VOCAB_SIZE


def test_maestro_folder_with_csv(tmp_path):
    for i in range(6):
        (tmp_path / "2018").mkdir(exist_ok=True)
        (tmp_path / "2018" / f"p{i}.midi").write_bytes(sample_midi())
    rows = ["canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration"]
    rows += [f"C,T,{s},2018,2018/p{i}.midi,x.wav,3.0"
             for i, s in enumerate(["train", "train", "train", "train", "validation", "test"])]
    (tmp_path / "maestro-v3.0.0.csv").write_text("\n".join(rows) + "\n")
    files = midi_files(tmp_path)
    assert [len(files[k]) for k in ("train", "val", "test")] == [4, 1, 1]
    splits = load_music_splits(4, 1, 1, seed=0, data_dir=tmp_path, block_len=4)
    assert splits.source.startswith("real: MAESTRO")
    assert splits.train.inputs.shape == (4, 4)
    seq = torch.tensor(encode_notes(read_midi(tmp_path / "2018" / "p0.midi")))
    blocks = make_blocks(seq, 4)
    assert any(torch.equal(splits.test.inputs[0], b[:-1]) for b in blocks)
    assert any(torch.equal(splits.test.targets[0], b[1:]) for b in blocks)


def test_maestro_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        midi_files(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no MIDI files"):
        midi_files(tmp_path)
    (tmp_path / "maestro-v3.0.0.csv").write_text("split,midi_filename\ntrain,gone.midi\n")
    with pytest.raises(FileNotFoundError, match=r"gone\.midi"):
        midi_files(tmp_path)


def test_chorale_standin_converts_only_what_it_needs_and_caches_each_piece(tmp_path,
                                                                           monkeypatch):
    from tdatune.data import music

    converted: list[str] = []
    real = music.chorale_notes

    def counting(name):
        converted.append(name)
        return real(name)

    monkeypatch.setattr(music, "chorale_notes", counting)
    # 12 blocks of 17 events: one chorale (~500 events) is enough, not all 371
    splits = load_music_splits(8, 2, 2, seed=0, block_len=16, cache=tmp_path)
    assert len(converted) == 1
    assert splits.source.startswith("stand-in: music21 Bach chorales (1 of 371 pieces)")
    assert int(splits.train.inputs.max()) < VOCAB_SIZE
    folder = music.chorale_cache(tmp_path)
    assert folder.parent == tmp_path and (folder / "names.json").exists()
    piece = folder / (converted[0].replace("/", "_") + ".json")
    assert piece.exists() and not list(folder.glob("*.tmp"))
    # the blocks are those of the converted piece, computed here independently
    blocks = make_blocks(music.encode_notes(real(converted[0])), 16)
    assert all(any(torch.equal(x, b[:-1]) for b in blocks) for x in splits.train.inputs)

    def refuse(name):
        raise AssertionError(f"{name} converted again instead of read from the cache")

    monkeypatch.setattr(music, "chorale_notes", refuse)
    again = load_music_splits(8, 2, 2, seed=0, block_len=16, cache=tmp_path)
    assert torch.equal(again.train.inputs, splits.train.inputs)
    assert torch.equal(again.test.targets, splits.test.targets)

    # a damaged cache file is converted again, to the same events
    monkeypatch.setattr(music, "chorale_notes", counting)
    piece.write_text('{"name": "cut')
    converted.clear()
    fixed = load_music_splits(8, 2, 2, seed=0, block_len=16, cache=tmp_path)
    assert len(converted) == 1 and torch.equal(fixed.train.inputs, splits.train.inputs)

    # the cache is keyed by what defines the conversion: another tempo, another folder
    monkeypatch.setattr(music, "CHORALE_BPM", 100.0)
    assert music.chorale_cache(tmp_path) != folder


def test_chorale_sequences_limits_pieces(tmp_path):
    from tdatune.data import music

    seqs = music.chorale_sequences(max_pieces=2, cache=tmp_path)
    names = music.chorale_names(tmp_path)[:2]
    assert seqs == [music.encode_notes(music.chorale_notes(n)) for n in names]
