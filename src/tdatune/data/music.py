"""Symbolic music as event sequences: MAESTRO MIDI from a user-given folder, or music21's
bundled Bach chorales as the offline stand-in.

Notes become the event vocabulary of the Music Transformer (Huang et al., 2018):
NOTE_ON(pitch) 0..127, NOTE_OFF(pitch) 128..255, TIME_SHIFT(k x 10 ms, k = 1..100)
256..355 and SET_VELOCITY(32 bins) 356..387; a velocity event is emitted only when the
velocity bin changes. Sequences are cut into non-overlapping blocks of ``block_len + 1``
events (next-event prediction), exactly as the text setting cuts token streams.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from pathlib import Path

import torch

from tdatune.data.base import Splits
from tdatune.data.midi import Note, read_midi
from tdatune.data.text import blocks_dataset, cut_blocks, make_blocks, unigram_loss

NOTE_ON, NOTE_OFF, TIME_SHIFT, VELOCITY = 0, 128, 256, 356
MAX_SHIFT_STEPS = 100
STEP_SECONDS = 0.01
VELOCITY_BINS = 32
VOCAB_SIZE = VELOCITY + VELOCITY_BINS  # 388
CHORALE_BPM = 125.0  # a quarter note = 0.48 s = 48 steps: sixteenths and triplets land on steps
CACHE_ENV = "TDATUNE_CACHE_DIR"
CACHE_VERSION = 1


def encode_notes(notes: list[Note]) -> list[int]:
    """Event tokens of ``notes`` (times quantised to 10 ms steps)."""
    events: list[tuple[int, int, int, int]] = []  # (step, order, pitch, velocity); offs first
    for n in notes:
        on, off = round(n.start / STEP_SECONDS), round(n.end / STEP_SECONDS)
        if off <= on:
            off = on + 1
        events.append((on, 1, n.pitch, n.velocity))
        events.append((off, 0, n.pitch, 0))
    events.sort()
    tokens: list[int] = []
    now, vel_bin = 0, -1
    for step, order, pitch, velocity in events:
        shift = step - now
        while shift > 0:
            k = min(shift, MAX_SHIFT_STEPS)
            tokens.append(TIME_SHIFT + k - 1)
            shift -= k
        now = step
        if order == 0:
            tokens.append(NOTE_OFF + pitch)
        else:
            b = min(VELOCITY_BINS - 1, velocity * VELOCITY_BINS // 128)
            if b != vel_bin:
                tokens.append(VELOCITY + b)
                vel_bin = b
            tokens.append(NOTE_ON + pitch)
    return tokens


def describe_token(token: int) -> str:
    """Human-readable name of one event token."""
    if token < NOTE_OFF:
        return f"on{token}"
    if token < TIME_SHIFT:
        return f"off{token - NOTE_OFF}"
    if token < VELOCITY:
        return f"shift{(token - TIME_SHIFT + 1) * 10}ms"
    return f"vel{token - VELOCITY}"


def chorale_notes(name: str) -> list[Note]:
    """Notes of one music21 corpus chorale (ties merged) at 125 bpm, velocity 64."""
    from music21 import corpus

    score = corpus.parse(name).stripTies()
    sec = 60.0 / CHORALE_BPM
    notes = []
    for element in score.flatten().notes:
        start = float(element.offset) * sec
        end = start + float(element.quarterLength) * sec
        for pitch in element.pitches:
            notes.append(Note(start, end, int(pitch.midi), 64))
    return sorted(notes, key=lambda n: (n.start, n.pitch))


def cache_dir(default: str | os.PathLike[str] | None = None) -> Path:
    """Where converted event sequences are cached: ``default``, $TDATUNE_CACHE_DIR or
    ~/.cache/tdatune."""
    if default is not None:
        return Path(default)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "tdatune"


def chorale_sequences(max_pieces: int | None = None,
                      cache: str | os.PathLike[str] | None = None) -> list[list[int]]:
    """Event sequences of the first ``max_pieces`` Bach chorales of music21's corpus (all 371 by
    default), converted once and cached as gzipped JSON."""
    from music21 import corpus

    names = sorted(str(n) for n in corpus.chorales.Iterator(returnType="filename"))
    if max_pieces is not None:
        names = names[:max_pieces]
    key = hashlib.sha256(json.dumps([CACHE_VERSION, CHORALE_BPM, names]).encode()).hexdigest()[:16]
    path = cache_dir(cache) / f"chorales-{len(names)}-{key}.json.gz"
    if path.exists():
        with gzip.open(path, "rt") as handle:
            return json.load(handle)
    seqs = [encode_notes(chorale_notes(n)) for n in names]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with gzip.open(tmp, "wt") as handle:
        json.dump(seqs, handle)
    os.replace(tmp, path)
    return seqs


def midi_files(directory: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """MIDI files of a MAESTRO-style folder by split (train / val / test), or all under 'all'.

    With maestro-v*.csv present its ``split`` and ``midi_filename`` columns decide; otherwise
    every *.mid / *.midi below the folder is listed (sorted) under 'all'.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"MAESTRO directory {directory} does not exist; point --data-dir at the unpacked "
            "maestro-v3.0.0 folder (MIDI files, optionally with maestro-v3.0.0.csv)"
        )
    tables = sorted(directory.glob("maestro-v*.csv"))
    if tables:
        with open(tables[-1], newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"split", "midi_filename"} <= set(rows[0]):
            raise ValueError(f"{tables[-1]} lacks the 'split' and 'midi_filename' columns")
        names = {"train": "train", "validation": "val", "test": "test"}
        out: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
        for row in rows:
            path = directory / row["midi_filename"]
            if not path.exists():
                raise FileNotFoundError(f"{tables[-1]} lists {row['midi_filename']}, missing "
                                        f"under {directory}")
            out[names.get(row["split"], "train")].append(path)
        return out
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in (".mid", ".midi"))
    if not files:
        raise FileNotFoundError(f"no MIDI files (*.mid, *.midi) found under {directory}")
    return {"all": files}


def _blocks_from(files: list[Path], need: int, block_len: int, gen: torch.Generator) -> torch.Tensor:
    """Blocks from the files in seeded order, parsing only until ``need`` blocks exist."""
    out: list[torch.Tensor] = []
    have = 0
    for i in torch.randperm(len(files), generator=gen).tolist():
        blocks = make_blocks(encode_notes(read_midi(files[i])), block_len)
        out.append(blocks)
        have += blocks.shape[0]
        if have >= need:
            break
    return torch.cat(out) if out else torch.empty(0, block_len + 1, dtype=torch.long)


def load_music_splits(
    n_train: int = 2000, n_val: int = 200, n_test: int = 200, seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None, *, block_len: int = 64,
    max_pieces: int | None = None, cache: str | os.PathLike[str] | None = None,
) -> Splits:
    """Event blocks for the music transformer.

    With ``data_dir`` (MAESTRO): the csv's train / validation / test pieces give the three
    splits (without a csv, blocks of all files are pooled and split with ``seed``). Without it:
    the Bach chorales' blocks are pooled, shuffled with ``seed`` and cut into train / val / test.
    """
    gen = torch.Generator().manual_seed(seed)
    if data_dir is not None:
        files = midi_files(data_dir)
        if "all" in files:
            pool = _blocks_from(files["all"], n_train + n_val + n_test, block_len, gen)
            train, val, test = cut_blocks(pool, (n_train, n_val, n_test), gen, f"MIDI under {data_dir}")
        else:
            parts = []
            for key, n in (("train", n_train), ("val", n_val), ("test", n_test)):
                blocks = _blocks_from(files[key], n, block_len, gen)
                if blocks.shape[0] < n:
                    raise ValueError(f"MAESTRO {key} pieces give {blocks.shape[0]} blocks, fewer "
                                     f"than {n}; lower the sizes")
                parts.append(blocks[torch.randperm(blocks.shape[0], generator=gen)[:n]])
            train, val, test = parts
        source = f"real: MAESTRO MIDI from {Path(data_dir)}"
    else:
        seqs = chorale_sequences(max_pieces, cache)
        pool = torch.cat([make_blocks(s, block_len) for s in seqs])
        train, val, test = cut_blocks(pool, (n_train, n_val, n_test), gen,
                                f"the Bach chorales ({len(seqs)} pieces)")
        source = f"stand-in: music21 Bach chorales ({len(seqs)} pieces) for MAESTRO"
    info: dict[str, object] = {
        "vocab_size": VOCAB_SIZE, "block_len": block_len,
        "unigram_loss_val": unigram_loss(train[:, 1:], val[:, 1:], VOCAB_SIZE),
        "unigram_loss_test": unigram_loss(train[:, 1:], test[:, 1:], VOCAB_SIZE),
    }
    return Splits(blocks_dataset(train), blocks_dataset(val), blocks_dataset(test),
                  name="music", source=source, num_classes=VOCAB_SIZE, info=info)
