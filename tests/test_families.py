"""The three model families of examples/selection_families.toml at tiny sizes: a Hugging Face ViT
trained by its own AdamW loop, a Hugging Face GPT-2 classifier trained by the ``Trainer``, and
ResNet-9 with GroupNorm. Each setting builds, trains one epoch on 40 examples, and
``attribute()`` scores with EK-FAC and IFFIM; ResNet-9's ``norm`` option changes only what it
says, and GroupNorm's affine parameters come from the layer hooks."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from data_writers import write_mnist_dir
from tdatune.data.base import ArrayDataset, Splits
from tdatune.evaluate.groundtruth import GroundTruthConfig, sample_subsets
from tdatune.features.gradients import GradientSource
from tdatune.models.batched import supports_batched, train_batched
from tdatune.models.resnet9 import GroupNormResNet9, ResNet9, resnet9
from tdatune.models.task import Task, model_params
from tdatune.models.training import TrainRecipe, train_model
from tdatune.settings import Setting, get_setting
from tdatune.settings.builtin import resnet9_task
from tdatune.study.attribute import attribute

ROOT = Path(__file__).resolve().parents[1]
SIZES = (40, 10, 6)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def examples_importable() -> Iterator[None]:
    """``examples.*`` importable, as from the repository root (where a sweep runs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        yield
    for name in [m for m in sys.modules if m == "examples" or m.startswith("examples.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Fashion-MNIST-format IDX files (the Debian package need not be installed)."""
    directory = tmp_path_factory.mktemp("fashion")
    write_mnist_dir(directory, n_train=600, n_test=200, seed=3)
    return directory


def fake_splits(n: int = 4) -> Splits:
    """Image splits of zeros: enough for a task's model, no data read."""
    data = ArrayDataset(torch.zeros(n, 3, 16, 16), torch.zeros(n, dtype=torch.long))
    return Splits(data, data, data, name="cifar2", source="test", num_classes=2)


def norm_kinds(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.GroupNorm)}


# ------------------------------------------------------------------ ResNet-9's norm option


def test_resnet9_default_keeps_batchnorm_and_group_swaps_every_norm() -> None:
    default = resnet9_task(fake_splits(), name="r", width=4)
    group = resnet9_task(fake_splits(), name="r", width=4, norm="group")
    torch.manual_seed(0)
    batch_model = default.make_model()
    torch.manual_seed(0)
    group_model = group.make_model()
    assert type(batch_model) is ResNet9 and norm_kinds(batch_model) == {nn.BatchNorm2d}
    assert type(group_model) is GroupNormResNet9 and norm_kinds(group_model) == {nn.GroupNorm}
    norms = [m for m in batch_model.modules() if isinstance(m, nn.BatchNorm2d)]
    groups = [m for m in group_model.modules() if isinstance(m, nn.GroupNorm)]
    assert [m.num_features for m in norms] == [m.num_channels for m in groups]
    assert [m.num_groups for m in groups] == [4, 8, 8, 8, 8, 8, 8, 8]  # gcd(channels, 8)
    # the same parameters (names, shapes, the convolutions' seeded initialisation), no buffers
    batch_params, group_params = model_params(batch_model), model_params(group_model)
    assert list(batch_params) == list(group_params)
    assert all(torch.equal(batch_params[k], group_params[k]) for k in batch_params)
    assert not list(group_model.buffers()) and list(batch_model.buffers())
    assert supports_batched(group) and not supports_batched(default)
    assert default.extra == {"width": 4}
    assert group.extra == {"width": 4, "norm": "group", "groups": 8}
    assert group_model(torch.randn(2, 3, 16, 16)).shape == (2, 2)


def test_resnet9_norm_option_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown norm 'layer'; choose one of: batch, group"):
        resnet9_task(fake_splits(), name="r", norm="layer")
    with pytest.raises(ValueError, match="groups=4 is an option of norm='group'"):
        resnet9_task(fake_splits(), name="r", groups=4)
    with pytest.raises(ValueError, match="unknown norm"):
        resnet9(2, 4, norm="instance")
    assert [m.num_groups for m in resnet9(2, 4, norm="group", groups=2).modules()
            if isinstance(m, nn.GroupNorm)] == [2] * 8


def test_groupnorm_affine_parameters_come_from_the_hooks() -> None:
    torch.manual_seed(1)
    task = Task(make_model=partial(GroupNormResNet9, 2, 2), name="gn")
    model = task.make_model()
    gen = torch.Generator().manual_seed(2)
    data = ArrayDataset(torch.randn(6, 3, 16, 16, generator=gen), torch.tensor([0, 1] * 3))
    source = GradientSource(task, model, model_params(model), probe=data)  # checked vs a loop
    assert source.mode == "hooks" and source.plan.leftover == [], source.reason
    hooked = {c.path: c.rule.kind for c in source.plan.layers}
    group_paths = [n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    assert len(group_paths) == 8 and all(hooked[p] == "norm" for p in group_paths)


def test_batched_retraining_of_groupnorm_equals_train_model() -> None:
    task = Task(make_model=partial(GroupNormResNet9, 2, 2), name="gn")
    gen = torch.Generator().manual_seed(3)
    train = ArrayDataset(torch.randn(24, 3, 16, 16, generator=gen), torch.arange(24) % 2)
    recipe = TrainRecipe(optimizer="sgd", epochs=1, lr=0.05, batch_size=8, momentum=0.9,
                         weight_decay=5e-4)
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=2, alpha=0.5, subset_seed=1))
    result = train_batched(task, train, masks, recipe, [0, 7])
    for m, seed in enumerate((0, 7)):
        alone = train_model(task, train.subset(masks[m]), recipe, seed)
        for name, value in alone.state.items():
            assert torch.allclose(result.state(m)[name], value, atol=1e-5, rtol=1e-4), name


# ------------------------------------------------------------------ the three families


def vit_family(fashion_dir: Path) -> tuple[Setting, dict]:
    from examples.vit_classifier import vit_setting

    return vit_setting(epochs=1), {"sizes": SIZES, "data_dir": fashion_dir, "seed": 1}


def gpt2_family(fashion_dir: Path) -> tuple[Setting, dict]:
    pytest.importorskip("accelerate")  # the Trainer needs it
    from examples.gpt2_classifier import gpt2_setting

    return gpt2_setting(SIZES, epochs=1), {}


def resnet9_gn_family(fashion_dir: Path) -> tuple[Setting, dict]:
    return get_setting("cifar2-resnet9"), {"sizes": SIZES, "data_dir": fashion_dir,
                                           "task_options": {"width": 2, "norm": "group"}}


FAMILIES = {"vit-fmnist": vit_family, "gpt2-cls-kjv": gpt2_family,
            "cifar2-resnet9-gn": resnet9_gn_family}


@pytest.mark.filterwarnings("ignore:the selected damping")  # a one-epoch model on 40 examples
@pytest.mark.filterwarnings("ignore:tdatune. fmnist-vit. torch.func.vmap")  # the ViT's raw params
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_and_attributes_with_ekfac_and_iffim(family: str, fashion_dir: Path
                                                           ) -> None:
    pytest.importorskip("transformers")
    setting, build = FAMILIES[family](fashion_dir)
    splits, task = setting.build(**build)
    assert (len(splits.train), len(splits.val), len(splits.test)) == SIZES
    recipe = setting.recipe
    if isinstance(recipe, TrainRecipe):
        recipe = replace(recipe, epochs=1, batch_size=20)
    trained = train_model(task, splits.train, recipe, seed=0)
    assert len(trained.checkpoints) == 1
    for name in ("ekfac", "iffim"):
        result = attribute(task, splits.train, splits.test, val=splits.val,
                           checkpoints=trained.checkpoints, weight_decay=recipe.weight_decay,
                           attributor=name)
        assert result.scores.shape == (SIZES[2], SIZES[0])
        assert torch.isfinite(result.scores).all() and result.scores.abs().sum() > 0
        if name == "ekfac" and family == "cifar2-resnet9-gn":
            # GroupNorm's affine parameters are in EK-FAC's diagonal block, as BatchNorm's
            model = task.make_model()
            gn = {f"{p}.{k}" for p, m in model.named_modules() if isinstance(m, nn.GroupNorm)
                  for k in ("weight", "bias")}
            assert len(gn) == 16 and gn <= set(result.attributor.fit_.diagonal)


def test_vit_setting_reads_no_data_until_built_and_names_the_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from examples.vit_classifier import vit_setting

    monkeypatch.setenv("TDATUNE_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    setting = vit_setting()  # what a sweep spec's validation does: no data read
    assert setting.sizes == (1000, 100, 100) and setting.name == "vit-fmnist"
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        setting.build()
