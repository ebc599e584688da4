"""Multinomial logistic regression and a fully connected MLP."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer on flattened inputs."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """ReLU multi-layer perceptron on flattened inputs, e.g. 784-128-64-10."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))
