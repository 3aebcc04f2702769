"""The defaults of the network options, in one place.

``BatchNorm``, ``build_model`` and the stages' ``TrainConfig`` (hence the CLI's options) all take
their defaults from here, so the Python API and the command line cannot drift apart.
"""
BN = "full"                  # build_model's bn: 'none' or a BatchNorm kind
BN_POSITION = "before"       # BN before or after the ReLU
BN_MOMENTUM = 0.1            # running = (1 - momentum) * running + momentum * batch
BN_EPS = 1e-5
GHOST_BATCH_SIZE = 32        # samples per ghost batch (kind 'ghost')
RENORM_RMAX = 3.0            # batch renormalization clips (kind 'renorm')
RENORM_DMAX = 5.0
DROPOUT = 0.0
MLP_HIDDEN = (256, 128)      # hidden widths of the 'mlp' model
DEPTH = 20                   # convolutions of "plain"; 6n + 2 layers of "resnet"
WIDTH = 16                   # first-stage channels of "plain" and "resnet" (doubled per stage)
INIT = "kaiming-uniform"     # weight init: PyTorch's default (see arraybn.nn.initialisation)
