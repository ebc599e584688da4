"""tdatune: training-data attribution that picks its own hyperparameters without retraining.

Layers (a module imports only from layers to its left):
utils -> data -> models -> settings -> features -> curvature -> attributors -> select
-> evaluate -> study -> cli
"""

__version__ = "0.1.0"
