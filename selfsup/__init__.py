"""selfsup: self-supervised visual representation learning in one code base.

run = selfsup.train("simclr/fashion_mnist", ["train.epochs=1"])
selfsup.evaluate(run)                      # {"knn_top1": ..., "linear_top1": ...}
features = selfsup.embed(run, "fashion_mnist:test")
tuned = selfsup.finetune(run)              # its encoder + a new head, trained on the labels
mine = selfsup.train("simclr", data=images, labels=None)   # a uint8 array (N, H, W[, C])
selfsup.neighbours(mine, "query.png", k=5)   # nearest training images by cosine of features
selfsup.studies.compare(["simclr/fashion_mnist", "byol/fashion_mnist"], minutes=8)   # one table
"""

from selfsup.backbones import create_backbone
from selfsup.config import Config, load_config
from selfsup.engine.train import finetune, train
from selfsup.eval.export import export
from selfsup.eval.neighbours import neighbours
from selfsup.eval.protocols import embed, evaluate, pixel_baselines
from selfsup.registry import BACKBONES, DATASETS, METHODS, VIEWS
from selfsup.run import Run, load
from selfsup.studies.compare import compare

__all__ = [
    "BACKBONES",
    "DATASETS",
    "METHODS",
    "VIEWS",
    "Config",
    "Run",
    "compare",
    "create_backbone",
    "embed",
    "evaluate",
    "export",
    "finetune",
    "load",
    "load_config",
    "neighbours",
    "pixel_baselines",
    "train",
]
__version__ = "0.1.0"
