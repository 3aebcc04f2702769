"""A trained LeNet-5 as a ``torch.nn.Module`` (for users who deploy with PyTorch).

``model.npz`` uses PyTorch's ``state_dict`` names and layouts, so it loads with ``strict=True``
into a module with the same layer names; ``bn_stats.npz`` (postproc) holds
``bnK.running_mean``/``bnK.running_var`` to put over the running ones. Inputs are normalised as
the manifest records: ``(pixels / 255 - mean) / std`` with train/manifest.json's
``dataset.normalisation``. torch is imported only when a module is built: it is never a
dependency of arraybn.
"""


def torch_lenet5(state, bn_position="before"):
    """A torch LeNet-5 (arraybn's ``lenet5``) loaded from ``state`` (model.npz's arrays, with or
    without BN) with ``load_state_dict(strict=True)``, in eval mode."""
    import torch
    from torch import nn

    class LeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            bn = "bn1.weight" in state
            bias = not bn or bn_position == "after"
            self.conv1 = nn.Conv2d(1, 6, 3, bias=bias)
            self.conv2 = nn.Conv2d(6, 16, 3, bias=bias)
            self.fc1 = nn.Linear(state["fc1.weight"].shape[1], 120, bias=bias)
            self.fc2 = nn.Linear(120, 84, bias=bias)
            self.fc3 = nn.Linear(84, state["fc3.weight"].shape[0])
            norms = (nn.BatchNorm2d(6), nn.BatchNorm2d(16), nn.BatchNorm1d(120),
                     nn.BatchNorm1d(84)) if bn else ()
            for k, norm in enumerate(norms, 1):
                setattr(self, f"bn{k}", norm)
            self.norms = list(norms) or [None] * 4

        def _block(self, h, norm):
            if norm is None:
                return torch.relu(h)
            return torch.relu(norm(h)) if bn_position == "before" else norm(torch.relu(h))

        def forward(self, x):
            h = nn.functional.max_pool2d(self._block(self.conv1(x), self.norms[0]), 2)
            h = nn.functional.max_pool2d(self._block(self.conv2(h), self.norms[1]), 2)
            h = self._block(self.fc1(h.flatten(1)), self.norms[2])
            return self.fc3(self._block(self.fc2(h), self.norms[3]))

    net = LeNet5()
    dtype = {"float32": torch.float32, "float64": torch.float64}[str(state["fc3.weight"].dtype)]
    net.to(dtype).load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    return net.eval()
