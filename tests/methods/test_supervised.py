"""Supervised training and fine-tuning through the one loop: the loss, labels reaching only the
methods that use them, pre-trained weights, frozen stages, resume, self-contained run folders."""

import json
import shutil

import numpy as np
import pytest
import torch

import selfsup
from selfsup.config import resolve
from selfsup.methods.base import Method
from selfsup.methods.simclr import SimCLR
from selfsup.methods.supervised import FineTune, Supervised
from selfsup.step import Views


def test_supervised_loss_is_the_cross_entropy_of_the_head_on_the_labels(tiny_backbone, progress):
    method = Supervised(tiny_backbone, num_classes=3)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 1, 0])
    out = method(Views([x], labels=labels), progress)
    with torch.no_grad():
        logits = method.head(method.backbone(x))
    expected = -torch.stack([logits[i].log_softmax(0)[labels[i]] for i in range(5)]).mean()
    torch.testing.assert_close(out["loss"].detach(), expected)
    top1 = 100 * (logits.argmax(1) == labels).float().mean()
    torch.testing.assert_close(out["train_top1"], top1)


def test_labels_reach_a_supervised_method_and_never_a_self_supervised_one(tiny_config, monkeypatch):
    seen = {}
    for cls in (SimCLR, Supervised):
        original = cls.forward

        def record(self, views, progress, original=original, name=cls.__name__):
            seen.setdefault(name, []).append(views.labels)
            return original(self, views, progress)

        monkeypatch.setattr(cls, "forward", record)
    tiny_config["train"].update(max_steps=2, knn_every=0)
    selfsup.train(resolve(tiny_config))
    tiny_config["method"] = {"name": "supervised"}
    tiny_config["train"]["name"] = "supervised"
    run = selfsup.train(resolve(tiny_config))
    assert seen["SimCLR"] == [None, None]
    data = selfsup.DATASETS.build(run.config.data, split="train")
    batches = selfsup.data.loader.Batches(data.images, 32, seed=0)
    for labels in seen["Supervised"]:
        assert torch.equal(labels, data.labels[batches.next()[1]])


def test_supervised_training_from_scratch_learns_and_resumes_exactly(tiny_config):
    tiny_config["method"] = {"name": "supervised"}
    tiny_config["views"] = {"name": "crop_flip", "size": 16, "scale": [0.5, 1.0]}
    tiny_config["train"].update(epochs=3, knn_every=3)
    straight = selfsup.train(resolve(tiny_config))
    losses = [r["loss"] for r in straight.metrics if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    assert selfsup.evaluate(straight, ["knn"])["knn_top1"] > 50  # chance: 10 %
    tiny_config["train"].update(name="halves", max_steps=13)
    half = selfsup.train(resolve(tiny_config))
    resumed = selfsup.train(resume=half.path, overrides=["train.max_steps=null"])
    a, b = straight.checkpoint()["method"], resumed.checkpoint()["method"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


@pytest.fixture
def pretrained(tiny_config):
    tiny_config["train"].update(epochs=1, knn_every=0, name="pretrained")
    return selfsup.train(resolve(tiny_config))


def _finetune(pretrained, *overrides):
    return selfsup.finetune(
        pretrained.path,
        [
            f"train.out_dir={pretrained.path.parent}",
            "train.knn_every=0",
            "train.progress=false",
            "optim.batch_size=32",
            *overrides,
        ],
        recipe="finetune/fashion_mnist",
    )


def _parameters(encoder):
    return {k: v.detach().clone() for k, v in encoder.named_parameters()}


def test_finetuning_starts_from_the_pretrained_encoder(pretrained):
    tuned = _finetune(pretrained, "optim.lr=0.0", "train.max_steps=1", "train.name=lr0")
    start = _parameters(selfsup.load(pretrained.path).encoder)
    after = _parameters(tuned.encoder)
    assert start.keys() == after.keys()
    assert all(torch.equal(start[k], after[k]) for k in start)  # lr 0: still the pre-trained ones
    assert tuned.config.data == pretrained.config.data
    assert tuned.config.backbone == pretrained.config.backbone


def test_finetuning_with_frozen_stages_moves_only_the_later_ones(pretrained):
    tuned = _finetune(pretrained, "method.freeze_to=layer3", "train.epochs=1", "train.name=f3")
    before = selfsup.load(pretrained.path).encoder.state_dict()
    after = tuned.encoder.state_dict()
    for key in before:
        frozen = not key.startswith("layer4")  # stem, layer1-3: weights and BN statistics
        assert torch.equal(before[key], after[key]) == frozen, key
    assert selfsup.evaluate(tuned, ["knn"])["knn_top1"] > 30


def test_a_finetuned_run_loads_and_resumes_without_the_run_it_started_from(pretrained, tmp_path):
    tuned = _finetune(pretrained, "train.max_steps=4", "train.name=selfcontained")
    assert (tuned.path / "init" / "config.yaml").is_file()
    shutil.rmtree(pretrained.path)
    resumed = selfsup.train(resume=tuned.path, overrides=["train.max_steps=6"])
    assert resumed.checkpoint()["step"] == 6
    assert selfsup.load(tuned.path).encoder.num_features == 64


def test_finetuning_errors_name_the_problem_and_the_fix(pretrained, tiny_config):
    with pytest.raises(ValueError, match="freeze_to='layer9'.*valid: layer1, layer2, layer3"):
        _finetune(pretrained, "method.freeze_to=layer9", "train.name=bad")
    tiny_config["method"] = {"name": "finetune"}
    tiny_config["train"]["name"] = "noinit"
    with pytest.raises(ValueError, match="set train.init=RUN_DIR"):
        selfsup.train(resolve(tiny_config))
    tiny_config["method"] = {"name": "simclr"}
    tiny_config["train"]["init"] = str(pretrained.path)
    with pytest.raises(ValueError, match="method 'simclr' takes none"):
        selfsup.train(resolve(tiny_config))
    with pytest.raises(ValueError, match="'method.num_classes' is set by the engine"):
        resolve({**tiny_config, "method": {"name": "supervised", "num_classes": 3}})


def test_finetune_keeps_frozen_modules_in_eval_mode(tiny_backbone):
    pretrained = Method(tiny_backbone)
    method = FineTune(tiny_backbone, pretrained=pretrained, num_classes=2, freeze_to="conv")
    method.train()
    assert not tiny_backbone.conv.training and tiny_backbone.bn.training
    assert not tiny_backbone.conv.weight.requires_grad and tiny_backbone.bn.weight.requires_grad


def test_a_classifier_run_is_evaluated_by_its_own_predictions(pretrained, capsys):
    from selfsup.cli import main

    tuned = _finetune(pretrained, "train.max_steps=4", "train.name=classify")
    method = tuned.method
    data = selfsup.DATASETS.build(tuned.config.data, split="test")
    with torch.no_grad():
        logits = method.classify(tuned.views.eval_transform(data.images))
    expected = 100 * (logits.argmax(1) == data.labels).float().mean().item()
    assert selfsup.evaluate(tuned, ["classify"])["classify_top1"] == pytest.approx(expected)
    assert main(["eval", "all", str(tuned.path)]) == 0
    assert {"classify_top1", "knn_top1", "linear_top1"} <= set(capsys.readouterr().out.split())
    with pytest.raises(ValueError, match="has no classifier"):
        selfsup.evaluate(pretrained, ["classify"])


def test_a_finetune_run_resumed_before_its_first_checkpoint_still_starts_pretrained(pretrained):
    tuned = _finetune(pretrained, "optim.lr=0.0", "train.max_steps=1", "train.name=nockpt")
    tuned.checkpoint_path.unlink()  # as if killed before the first save
    resumed = selfsup.train(resume=tuned.path)
    start = _parameters(selfsup.load(pretrained.path).encoder)
    after = _parameters(selfsup.load(resumed.path).encoder)
    assert all(torch.equal(start[k], after[k]) for k in start)


def _simclr_v2_head(backbone):
    """SimCLR with v2's 3-layer projector (Linear-BN-ReLU twice, then Linear), in eval mode with
    non-trivial BN statistics."""
    method = SimCLR(backbone, hidden=16, dim=4, layers=3)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for bn in (method.projector[1], method.projector[4]):
            bn.running_mean.normal_(generator=generator)
            bn.running_var.uniform_(0.5, 2.0, generator=generator)
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.normal_(generator=generator)
    return method.eval()


def _classifier_input(method, x):
    captured = []
    handle = method.head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        method.classify(x)
    handle.remove()
    return captured[0]


def _bn(bn, x):
    return (x - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight + bn.bias


def test_finetuning_from_the_projector_classifies_relu_bn_of_w_mlp_h(tiny_backbone):
    pretrained = _simclr_v2_head(tiny_backbone)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = pretrained.backbone(x)
        (w1, bn1, _, w2, bn2, _, _) = pretrained.projector
        first = _bn(bn1, h @ w1.weight.T).relu()  # σ(W_mlp h), SimCLR v2 §2
        second = _bn(bn2, first @ w2.weight.T).relu()
    for blocks, expected in [(0, h), (1, first), (2, second)]:
        method = FineTune(
            tiny_backbone, pretrained=pretrained, num_classes=3, from_projector=blocks
        )
        method.eval()
        torch.testing.assert_close(_classifier_input(method, x), expected)
        torch.testing.assert_close(method.encoder(x).detach(), expected)  # what evaluation sees
        assert method.head.in_features == method.encoder.num_features == expected.shape[1]
    assert method.head.in_features == 16  # the projector's hidden width, not the encoder's 8


def test_finetuning_from_the_projector_errors_name_the_valid_depths(tiny_backbone):
    pretrained = _simclr_v2_head(tiny_backbone)
    with pytest.raises(ValueError, match="from_projector=3.*has 2 hidden layer.*valid: 0 to 2"):
        FineTune(tiny_backbone, pretrained=pretrained, num_classes=3, from_projector=3)
    with pytest.raises(ValueError, match="from_projector must be >= 0, got -1"):
        FineTune(tiny_backbone, pretrained=pretrained, num_classes=3, from_projector=-1)
    classifier = Supervised(tiny_backbone, num_classes=3)
    with pytest.raises(ValueError, match=r"pre-trained method \(Supervised\) has none"):
        FineTune(tiny_backbone, pretrained=classifier, num_classes=3, from_projector=1)


def test_a_finetune_run_from_the_projector_on_a_label_fraction(pretrained):
    """SimCLR v2's protocol: fine-tune from the first projector layer on a quarter of the labels."""
    tuned = _finetune(
        pretrained, "method.from_projector=1", "train.label_fraction=0.25", "optim.lr=0.0",
        "train.max_steps=2", "train.name=v2",
    )  # fmt: skip
    source = selfsup.load(pretrained.path).method
    encoder = tuned.encoder
    start = {**_parameters(source.backbone), **_parameters(source.projector[:3])}
    after = {**_parameters(encoder.encoder), **_parameters(encoder.projector)}
    assert start.keys() == after.keys()
    assert all(torch.equal(start[k], after[k]) for k in start)  # lr 0: the pre-trained weights
    with torch.no_grad():
        assert encoder(torch.rand(2, 1, 16, 16)).shape == (2, 64)  # what eval and embed see
    assert tuned.info["train_size"] == 80  # 8 of the 32 images of each of the 10 classes
    assert len(json.loads((tuned.path / "labelled.json").read_text())["indices"]) == 80
    logged = [r["epoch"] for r in tuned.metrics if r.get("step") == 2 and "loss" in r]
    assert logged == [1.0]  # an epoch is 80 // 32 = 2 steps
