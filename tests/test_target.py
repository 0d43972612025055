"""train.target for the methods whose online network embeds both views (arXiv 2112.05141 Table 2):
the momentum target gets no gradient and follows the EMA; the stop-gradient target keeps the loss
value and stops the target side's gradient; configs, runs and resumes keep the setting."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selfsup
from selfsup.build import build_method
from selfsup.config import resolve
from selfsup.losses import barlow_twins, cross_correlation, negative_cosine, vicreg_terms
from selfsup.methods.barlow_twins import BarlowTwins
from selfsup.methods.simclr import SimCLR
from selfsup.methods.simsiam import SimSiam
from selfsup.methods.vicreg import VICReg
from selfsup.step import Progress, Views
from selfsup.target import use_target_setting
from tests.methods.conftest import TinyBackbone

TEMPERATURE, MOMENTUM = 0.5, 0.9
METHODS = {
    "simclr": lambda backbone: SimCLR(backbone, dim=4, hidden=16, temperature=TEMPERATURE),
    "barlow_twins": lambda backbone: BarlowTwins(backbone, dim=8, hidden=16),
    "vicreg": lambda backbone: VICReg(backbone, dim=8, hidden=16),
    "simsiam": lambda backbone: SimSiam(backbone, dim=8, hidden=16, predictor_hidden=4),
}
START = Progress(step=0, epoch=0.0, fraction=0.0)


def _method(name, target, seed=0):
    torch.manual_seed(seed)
    method = METHODS[name](TinyBackbone())
    use_target_setting(method, target, MOMENTUM)  # as the build step does
    return method


def _views():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 1, 8, 8, generator=generator) for _ in range(2)]


def _online_parameters(method):
    return [p for name, p in method.named_parameters() if not name.startswith("target_branch.")]


def _gradient(loss, method):
    return torch.autograd.grad(loss, _online_parameters(method), allow_unused=True)


def _assert_same_gradient(a, b):
    for g, h in zip(a, b, strict=True):
        if g is None or h is None:  # SimSiam's predictor does not reach t
            assert g is None and h is None
        else:
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


def _nt_xent_by_hand(z, t):
    """l(i, j) = −log exp(sim(z_i, t_j)/τ) / Σ_{k≠i} exp(sim(z_i, t_k)/τ), mean over the 2N
    anchors z (2N, D); t (2N, D) the other side; j = i ± N, the same image's other view."""
    a, c = F.normalize(z, dim=1), F.normalize(t, dim=1)
    n, losses = len(a) // 2, []
    for i in range(2 * n):
        similarity = [torch.exp(a[i] @ c[k] / TEMPERATURE) for k in range(2 * n)]
        denominator = sum(s for k, s in enumerate(similarity) if k != i)
        losses.append(-torch.log(similarity[(i + n) % (2 * n)] / denominator))
    return torch.stack(losses).mean()


def _vicreg_loss(method, a, b):
    s, v, c = vicreg_terms(a, b, method.std_target, method.eps)
    return method.invariance_weight * s + method.variance_weight * v + method.covariance_weight * c


def _loss_by_hand(name, method, x1, x2, target):
    """The loss of the views with online outputs z and the target side `target(x, z)`."""
    if name == "simclr":  # one BN batch over both views, as the method
        z = method.projector(method.backbone(torch.cat([x1, x2])))
        return _nt_xent_by_hand(z, target(torch.cat([x1, x2]), z))
    z1, z2 = (method.projector(method.backbone(x)) for x in (x1, x2))
    t1, t2 = target(x1, z1), target(x2, z2)
    if name == "simsiam":
        p1, p2 = method.predictor(z1), method.predictor(z2)
        return 0.5 * negative_cosine(p1, t2) + 0.5 * negative_cosine(p2, t1)
    if name == "barlow_twins":
        weight = method.off_diagonal_weight
        return 0.5 * (
            barlow_twins(cross_correlation(z1, t2), weight)
            + barlow_twins(cross_correlation(t1, z2), weight)
        )
    return 0.5 * (_vicreg_loss(method, z1, t2) + _vicreg_loss(method, t1, z2))


def _momentum_network(method):
    return nn.Sequential(*method.target_branch.ema.copies)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_momentum_target_gets_no_gradient_and_the_online_side_is_pulled_to_a_constant(name):
    method = _method(name, "momentum")
    with torch.no_grad():  # the online network moves away from its momentum copy
        for p in _online_parameters(method):
            p.add_(0.1 * torch.randn_like(p))
    x1, x2 = _views()
    loss = method(Views([x1, x2]), START)["loss"]
    copies = list(method.target_branch.parameters())
    assert copies and not any(p.requires_grad for p in copies)

    def constant(x, z):  # the momentum network's output, outside any graph
        with torch.no_grad():
            t = _momentum_network(method)(x)
        assert not torch.allclose(t, z)
        return t

    expected = _loss_by_hand(name, method, x1, x2, constant)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    _assert_same_gradient(_gradient(loss, method), _gradient(expected, method))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_momentum_target_moves_by_the_ema_of_the_online_weights_after_a_step(name):
    method = _method(name, "momentum")
    optimizer = torch.optim.SGD(_online_parameters(method), lr=0.5)
    out = method(Views(_views()), START)
    out["loss"].backward()
    optimizer.step()
    target_before = [p.clone() for p in _momentum_network(method).parameters()]
    online = nn.Sequential(method.backbone, method.projector)
    fraction = 0.5  # m = 1 − (1 − m₀)(cos(π/2) + 1)/2 = 1 − (1 − m₀)/2
    m = 1 - (1 - MOMENTUM) * (math.cos(math.pi * fraction) + 1) / 2
    with torch.no_grad():
        method.after_step(Progress(step=5, epoch=0.5, fraction=fraction), out)
    after = list(_momentum_network(method).parameters())
    for t, before, o in zip(after, target_before, online.parameters(), strict=True):
        torch.testing.assert_close(t, m * before + (1 - m) * o, rtol=1e-6, atol=1e-7)
    for t, o in zip(_momentum_network(method).buffers(), online.buffers(), strict=True):
        assert torch.equal(t, o)  # BN statistics copied, as every EMA's


@pytest.mark.parametrize("name", sorted(METHODS))
def test_stop_gradient_keeps_the_loss_value_and_detaches_the_target_side(name):
    published, stopped = _method(name, "method"), _method(name, "stop_gradient")
    assert not list(stopped.target_branch.parameters())  # no own weights
    x1, x2 = _views()
    loss = stopped(Views([x1, x2]), START)["loss"]
    torch.testing.assert_close(loss, published(Views([x1, x2]), START)["loss"], rtol=0, atol=1e-6)
    expected = _loss_by_hand(name, stopped, x1, x2, lambda x, z: z.detach())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    _assert_same_gradient(_gradient(loss, stopped), _gradient(expected, stopped))


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_stop_gradient_halves_the_gradient_of_a_symmetric_loss(name):
    # ½[L(z1, sg z2) + L(sg z1, z2)]: each view receives its own half of ∇L(z1, z2)
    published, stopped = _method(name, "method"), _method(name, "stop_gradient")
    views = Views(_views())
    full = _gradient(published(views, START)["loss"], published)
    half = _gradient(stopped(views, START)["loss"], stopped)
    _assert_same_gradient(half, [0.5 * g for g in full])


def test_simsiam_as_published_is_its_stop_gradient_setting():
    published, stopped = _method("simsiam", "method"), _method("simsiam", "stop_gradient")
    assert published.target_branch.kind == stopped.target_branch.kind == "stop_gradient"


def test_simclr_as_published_is_nt_xent_with_gradient_through_both_views():
    method = _method("simclr", "method")
    x1, x2 = _views()
    loss = method(Views([x1, x2]), START)["loss"]
    expected = _loss_by_hand("simclr", method, x1, x2, lambda x, z: z)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    _assert_same_gradient(_gradient(loss, method), _gradient(expected, method))


def _config(method, **train):
    return {
        "method": {"name": method},
        "backbone": {"name": "resnet18", "stem": "small", "width": 0.125},
        "data": {"name": "synthetic", "per_class": 4, "size": 16},
        "views": {"name": "simclr", "size": 16},
        "train": train,
    }


INFO = {"channels": 1, "image_size": 16, "mean": [0.5], "std": [0.25], "num_classes": 10,
        "classes": [str(i) for i in range(10)], "train_size": 40}  # fmt: skip


def test_an_unknown_target_setting_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: method, stop_gradient, momentum"):
        resolve(_config("simclr", target="ema"))


def test_a_method_without_a_target_branch_accepts_only_method():
    with pytest.raises(ValueError, match="valid for 'swav': method .*simsiam"):
        resolve(_config("swav", target="momentum"))
    resolve(_config("swav", target="method"))


def test_a_target_momentum_out_of_range_is_refused():
    with pytest.raises(ValueError, match="train.target_momentum' must be in"):
        resolve(_config("simclr", target="momentum", target_momentum=1.5))


def test_build_gives_the_method_the_setting_and_its_momentum():
    raw = _config("vicreg", target="momentum", target_momentum=0.99)
    raw["method"].update(dim=16, hidden=16)
    method = build_method(resolve(raw), INFO)
    assert method.target_branch.kind == "momentum" and method.target_branch.momentum == 0.99
    assert any(key.startswith("target_branch.ema.copies.") for key in method.state_dict())


def test_momentum_is_the_published_method_for_a_method_with_its_own_ema():
    raw = _config("byol")
    raw["method"].update(dim=8, hidden=16)
    torch.manual_seed(0)
    published = build_method(resolve(raw), INFO)
    raw["train"] = {"target": "momentum"}
    torch.manual_seed(0)
    momentum = build_method(resolve(raw), INFO)
    a, b = published.state_dict(), momentum.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_momentum_target_run_resumes_exactly_and_loads_its_ema(tiny_config):
    tiny_config["method"] = {"name": "barlow_twins", "dim": 16, "hidden": 32}
    tiny_config["optim"]["batch_size"] = 16
    tiny_config["train"].update(
        max_steps=4, knn_every=0, name="straight", target="momentum", target_momentum=0.9
    )
    straight = selfsup.train(resolve(tiny_config)).checkpoint()
    tiny_config["train"].update(max_steps=2, name="halves")
    first_half = selfsup.train(resolve(tiny_config))
    with pytest.raises(ValueError, match="train.target cannot change on resume"):
        selfsup.train(resume=first_half.path, overrides=["train.target=method"])
    resumed_run = selfsup.train(resume=first_half.path, overrides=["train.max_steps=4"])
    resumed = resumed_run.checkpoint()
    assert straight["step"] == resumed["step"] == 4
    a, b = straight["method"], resumed["method"]
    assert a.keys() == b.keys()
    assert any(key.startswith("target_branch.ema.copies.") for key in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    loaded = selfsup.load(resumed_run.path).method.state_dict()  # rebuilt from config.yaml
    assert loaded.keys() == b.keys() and all(torch.equal(loaded[k], b[k]) for k in b)


def test_compare_does_not_reuse_a_run_of_another_target_setting(tmp_path):
    from types import SimpleNamespace

    from selfsup.studies.runs import check_reusable

    published = resolve(_config("simclr"))
    momentum = resolve(_config("simclr", target="momentum"))
    run = SimpleNamespace(
        path=tmp_path, config=published, metrics=[{"event": "budget", "budget_minutes": 1.0}]
    )
    check_reusable(run, published, 1.0)
    with pytest.raises(ValueError, match=r"other settings \(train.target\); write into another"):
        check_reusable(run, momentum, 1.0)


def test_simclr_v2_memory_network_is_a_stop_gradient_copy_or_stays_beside_the_momentum_target():
    stopped = SimCLR(TinyBackbone(), dim=4, hidden=16, queue_size=12)
    use_target_setting(stopped, "stop_gradient")
    assert stopped.target.shares_online and stopped.target_branch.ema is None
    momentum = SimCLR(TinyBackbone(), dim=4, hidden=16, queue_size=12)
    use_target_setting(momentum, "momentum", MOMENTUM)
    assert not momentum.target.shares_online and momentum.target_branch.ema is not None
    out = momentum(Views(_views()), START)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["keys"].shape == (12, 4)
