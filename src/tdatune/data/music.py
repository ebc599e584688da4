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
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tdatune.data.base import Splits
from tdatune.data.midi import Note, read_midi
from tdatune.data.text import blocks_dataset, cut_blocks, make_blocks, unigram_loss
from tdatune.utils.atomic import (
    DamagedFileError,
    atomic_write_json,
    read_json,
    remove_with_record,
)

NOTE_ON, NOTE_OFF, TIME_SHIFT, VELOCITY = 0, 128, 256, 356
MAX_SHIFT_STEPS = 100
STEP_SECONDS = 0.01
VELOCITY_BINS = 32
VOCAB_SIZE = VELOCITY + VELOCITY_BINS  # 388
CHORALE_BPM = 125.0  # a quarter note = 0.48 s = 48 steps: sixteenths and triplets land on steps
CACHE_ENV = "TDATUNE_CACHE_DIR"
CACHE_VERSION = 2  # 2: one file per piece, converted on demand


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


def piano_roll(tokens: list[int]) -> torch.Tensor:
    """A block of event tokens as a piano roll [128 pitches, steps] (1 where a note sounds,
    in 10 ms steps). A block is cut from the middle of a piece: a note whose NOTE_ON lies
    before the block sounds from step 0, one still on at the end sounds to the last step."""
    events: list[tuple[int, int, int]] = []  # (pitch, start step, end step)
    start: dict[int, int] = {}
    now = 0
    for t in tokens:
        t = int(t)
        if NOTE_ON <= t < NOTE_OFF:
            start.setdefault(t - NOTE_ON, now)
        elif NOTE_OFF <= t < TIME_SHIFT:
            pitch = t - NOTE_OFF
            events.append((pitch, start.pop(pitch, 0), now))
        elif TIME_SHIFT <= t < VELOCITY:
            now += t - TIME_SHIFT + 1
    events += [(pitch, s, now) for pitch, s in start.items()]
    roll = torch.zeros(128, max(now, 1))
    for pitch, s, e in events:
        roll[pitch, s : max(e, s + 1)] = 1.0
    return roll


def _music21_corpus() -> Any:
    """music21's corpus module, or an error with the command that installs music21."""
    try:
        from music21 import corpus
    except ImportError as err:
        raise ModuleNotFoundError(
            "the Bach chorale stand-in for MAESTRO comes from PyPI music21, which is not "
            "installed. Install it with: pip install -e '.[data]' (in a tdatune checkout; or pip "
            "install 'music21==10.5.1'), or pass a MAESTRO folder with --data-dir") from err
    return corpus


def chorale_notes(name: str) -> list[Note]:
    """Notes of one music21 corpus chorale (ties merged) at 125 bpm, velocity 64."""
    score = _music21_corpus().parse(name).stripTies()
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


def conversion_spec() -> dict[str, object]:
    """Everything that defines a chorale's event sequence: the encoder's version and
    constants, the tempo and velocity used, and the music21 release (its corpus files)."""
    _music21_corpus()  # raises with the install command when music21 is missing
    import music21

    return {"cache_version": CACHE_VERSION, "bpm": CHORALE_BPM, "velocity": 64,
            "step_seconds": STEP_SECONDS, "max_shift_steps": MAX_SHIFT_STEPS,
            "velocity_bins": VELOCITY_BINS, "music21": str(music21.__version__)}


def chorale_cache(cache: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder of this conversion: ``chorales-<16 hex of the spec's SHA-256>``, so a
    changed encoder, tempo or music21 release never reads an old conversion."""
    spec = json.dumps(conversion_spec(), sort_keys=True)
    return cache_dir(cache) / f"chorales-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"


def _cached(path: Path, check: Callable[[Any], bool]) -> Any | None:
    """The JSON content of ``path`` when it exists, is intact and passes ``check``; else None
    (a damaged file is removed and recomputed by the caller)."""
    if not path.exists():
        return None
    try:
        obj = read_json(path)
    except (DamagedFileError, OSError):
        remove_with_record(path)
        return None
    return obj if check(obj) else None


def chorale_names(cache: str | os.PathLike[str] | None = None) -> list[str]:
    """Corpus names of music21's 371 Bach chorales, sorted (listed once, then cached)."""
    path = chorale_cache(cache) / "names.json"
    names = _cached(path, lambda o: isinstance(o, list) and bool(o))
    if names is None:
        corpus = _music21_corpus()
        names = sorted(str(n) for n in corpus.chorales.Iterator(returnType="filename"))
        atomic_write_json(path, names)
    return names


def chorale_events(name: str, cache: str | os.PathLike[str] | None = None) -> list[int]:
    """Event tokens of one chorale, converted on first use and cached as one atomic JSON file
    per piece (named by the piece, keyed by ``chorale_cache``)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    path = chorale_cache(cache) / f"{safe}.json"
    hit = _cached(path, lambda o: isinstance(o, dict) and o.get("name") == name)
    if hit is not None:
        return hit["events"]
    events = encode_notes(chorale_notes(name))
    atomic_write_json(path, {"name": name, "events": events})
    return events


def chorale_sequences(max_pieces: int | None = None,
                      cache: str | os.PathLike[str] | None = None) -> list[list[int]]:
    """Event sequences of the first ``max_pieces`` Bach chorales (all 371 by default); each
    piece is converted once and cached (``chorale_events``)."""
    names = chorale_names(cache)
    return [chorale_events(n, cache) for n in names[:max_pieces]]


def chorale_blocks(need: int, block_len: int, gen: torch.Generator,
                   max_pieces: int | None = None,
                   cache: str | os.PathLike[str] | None = None) -> tuple[torch.Tensor, int]:
    """Blocks of the chorales in the seeded order of ``gen``, converting (or reading from the
    cache) only until ``need`` blocks exist: (blocks, pieces used). A run that needs 12
    blocks converts one or two pieces, not 371."""
    names = chorale_names(cache)[:max_pieces]
    out: list[torch.Tensor] = []
    have = used = 0
    for i in torch.randperm(len(names), generator=gen).tolist():
        blocks = make_blocks(chorale_events(names[i], cache), block_len)
        out.append(blocks)
        have += blocks.shape[0]
        used += 1
        if have >= need:
            break
    pool = torch.cat(out) if out else torch.empty(0, block_len + 1, dtype=torch.long)
    return pool, used


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
    the Bach chorales are converted in an order drawn with ``seed`` until they give enough
    blocks (each piece cached on disk, see ``chorale_blocks``), and those blocks are shuffled
    with ``seed`` and cut into train / val / test.
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
        pool, used = chorale_blocks(n_train + n_val + n_test, block_len, gen, max_pieces, cache)
        train, val, test = cut_blocks(pool, (n_train, n_val, n_test), gen,
                                      f"the Bach chorales ({used} pieces)")
        source = (f"stand-in: music21 Bach chorales ({used} of {len(chorale_names(cache))} "
                  "pieces) for MAESTRO")
    info: dict[str, object] = {
        "vocab_size": VOCAB_SIZE, "block_len": block_len,
        "unigram_loss_val": unigram_loss(train[:, 1:], val[:, 1:], VOCAB_SIZE),
        "unigram_loss_test": unigram_loss(train[:, 1:], test[:, 1:], VOCAB_SIZE),
    }
    return Splits(blocks_dataset(train), blocks_dataset(val), blocks_dataset(test),
                  name="music", source=source, num_classes=VOCAB_SIZE, info=info)
