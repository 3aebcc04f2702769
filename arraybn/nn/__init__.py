"""arraybn.nn: a minimal manual-backprop trainer's building blocks.

Layers with explicit forward/backward (Conv2d, Dense, BatchNorm, ReLU, MaxPool2d, Dropout,
Flatten), the LeNet-5/MLP family and deeper nets (``build_model``; weight initialisations
``INIT_SCHEMES``), softmax cross-entropy, SGD/Adam and learning-rate schedules. Every array
operation goes through the model's backend (``xp``), so the same code runs on numpy, numba and
cupy; every BN layer calls the BN core.
"""
from arraybn.nn.batchnorm import BN_KINDS, BatchNorm
from arraybn.nn.conv import Conv2d, MaxPool2d
from arraybn.nn.initialisation import INIT_SCHEMES
from arraybn.nn.layers import Dense, Dropout, Flatten, Layer, Parameter, ReLU
from arraybn.nn.loss import softmax_cross_entropy
from arraybn.nn.models import BN_CHOICES, BN_POSITIONS, MODEL_NAMES, Network, build_model
from arraybn.nn.optim import SGD, Adam, Optimizer
from arraybn.nn.schedule import SCHEDULES, make_schedule

__all__ = ["build_model", "Network", "MODEL_NAMES", "BN_CHOICES", "BN_POSITIONS", "BatchNorm",
           "BN_KINDS", "Conv2d", "MaxPool2d", "Dense", "Dropout", "Flatten", "ReLU", "Layer",
           "Parameter", "softmax_cross_entropy", "SGD", "Adam", "Optimizer", "make_schedule",
           "SCHEDULES", "INIT_SCHEMES"]
