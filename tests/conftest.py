import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def tiny_config(tmp_path):
    """A seconds-long SimCLR run on the synthetic dataset: a raw config dict."""
    return {
        "method": {"name": "simclr", "hidden": 64, "dim": 32, "temperature": 0.5},
        "backbone": {"name": "resnet18", "stem": "small", "width": 0.125},
        "data": {"name": "synthetic", "per_class": 32, "size": 16},
        "views": {
            "name": "simclr",
            "size": 16,
            "blur_p": 0.0,
            "scale": [0.4, 1.0],
            "strength": 0.5,
        },
        "optim": {"name": "sgd", "lr": 0.3, "batch_size": 32, "warmup_epochs": 1},
        "train": {
            "epochs": 2,
            "out_dir": str(tmp_path / "runs"),
            "name": "tiny",
            "progress": False,
            "log_every": 2,
        },
        "eval": {"monitor_train": 200, "monitor_test": 100, "knn_k": 20, "linear_epochs": 20},
    }


@pytest.fixture
def study_config(tiny_config):
    """tiny_config for the studies that train several runs (gap, momentum): 4 synthetic classes
    of 16 images, batch 8, no kNN monitor or collapse guard, probes cut to seconds."""
    tiny_config["data"].update(num_classes=4, per_class=16)
    tiny_config["optim"]["batch_size"] = 8
    tiny_config["train"].update(knn_every=0, collapse_guard=False)
    tiny_config["eval"].update(linear_epochs=5, linear_weight_decay=1e-4)
    return tiny_config


class Constant(torch.nn.Module):
    """An encoder that maps every image to the same vector: a collapsed representation."""

    num_features = 8

    def forward(self, x):
        return torch.ones(x.shape[0], self.num_features, device=x.device)


@pytest.fixture
def collapsed_simclr(monkeypatch):
    """SimCLR whose encoder (what the collapse guard watches) has collapsed."""
    from selfsup.methods.simclr import SimCLR

    monkeypatch.setattr(SimCLR, "encoder", property(lambda self: Constant()))
