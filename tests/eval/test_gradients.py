"""The gradient decomposition (Tao et al. 2022, arXiv 2112.05141): every family's parts sum to
autograd's gradient of the library's own loss with the targets held constant, the InfoNCE weights
are the softmax, a hand-computed case, the scalars on a hand case, and the run-level function and
command on tiny trained runs."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import selfsup
from selfsup import losses
from selfsup.cli import main
from selfsup.config import resolve
from selfsup.decomposition import (
    barlow_twins_parts,
    cosine_parts,
    gradient_scalars,
    info_nce_parts,
    info_nce_probabilities,
    invariant_spreading_parts,
    unigrad_parts,
    vicreg_parts,
)
from selfsup.eval.gradients import gradient_decomposition
from selfsup.methods import with_gradient_terms
from selfsup.registry import METHODS
from selfsup.step import Progress, Views
from selfsup.target import use_target_setting

EXACT = {"rtol": 0.0, "atol": 1e-10}  # double precision: well inside a 1e-6 tolerance


def unit(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def autograd_of(loss_of, u):
    """∂loss/∂u with u a fresh leaf; whatever else loss_of uses is a constant."""
    u = u.detach().requires_grad_()
    return torch.autograd.grad(loss_of(u), u)[0]


def total(parts):
    return sum(parts.values())


def test_info_nce_parts_sum_to_the_gradient_of_moco_info_nce_with_a_queue():
    n, k, d, tau = 6, 9, 5, 0.2
    q, keys, queue = unit(n, d, seed=0), unit(n, d, seed=1), unit(k, d, seed=2)
    expected = autograd_of(lambda u: losses.info_nce(u, keys, queue, tau), q)
    exclude = F.pad(~torch.eye(n, dtype=torch.bool), (0, k))  # other queries' keys: not candidates
    parts = info_nce_parts(q, torch.cat([keys, queue]), torch.arange(n), tau, exclude)
    assert set(parts) == {"positive", "negative"}
    torch.testing.assert_close(total(parts), expected, **EXACT)


def test_info_nce_parts_sum_to_the_gradient_of_moco_v3_in_batch_info_nce():
    n, d, tau = 7, 4, 0.5
    q, keys = unit(n, d, seed=3), unit(n, d, seed=4)
    expected = autograd_of(lambda u: losses.in_batch_info_nce(u, keys, torch.arange(n), tau), q)
    torch.testing.assert_close(
        total(info_nce_parts(q, keys, torch.arange(n), tau)), expected, **EXACT
    )


@pytest.mark.parametrize("queue_size", [0, 5])
def test_info_nce_parts_sum_to_simclr_anchor_gradient_with_detached_candidates(queue_size):
    # NT-Xent's anchor side: anchor a among its partner, the other 2N − 2 views and the memory,
    # written with info_nce_hybrid's per-query negatives so the candidates are constants.
    n, d, tau = 4, 6, 0.5
    z, memory = unit(2 * n, d, seed=5), unit(queue_size, d, seed=6)
    partner = torch.arange(2 * n).roll(n)
    others = torch.stack([torch.tensor([b for b in range(2 * n) if b not in (a, partner[a])])
                          for a in range(2 * n)])  # fmt: skip
    candidates = z.detach()

    def anchor_loss(u):
        own = (u[:, None, :] * candidates[others]).sum(dim=-1)  # (2N, 2N − 2)
        return losses.info_nce_hybrid(u, candidates[partner], memory, own, tau)

    exclude = F.pad(torch.eye(2 * n, dtype=torch.bool), (0, queue_size))
    parts = info_nce_parts(z, torch.cat([candidates, memory]), partner, tau, exclude)
    torch.testing.assert_close(total(parts), autograd_of(anchor_loss, z), **EXACT)


def test_info_nce_negative_weights_are_the_softmax_and_sum_to_one_minus_p_positive():
    n, d, tau = 5, 3, 0.3
    q, candidates = unit(n, d, seed=7), unit(2 * n, d, seed=8)
    positives = torch.tensor([3, 0, 9, 4, 1])
    p = info_nce_probabilities(q, candidates, tau)
    logits = q @ candidates.T / tau
    direct = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    torch.testing.assert_close(p, direct, **EXACT)
    p_positive = p[torch.arange(n), positives]
    negative_weights = p.scatter(1, positives[:, None], 0.0)
    torch.testing.assert_close(negative_weights.sum(dim=1), 1 - p_positive, **EXACT)
    # the negative part is (1 − p⁺)/(Mτ) times the p-weighted mean of the negatives
    parts = info_nce_parts(q, candidates, positives, tau)
    mean_negative = negative_weights @ candidates / (1 - p_positive)[:, None]
    torch.testing.assert_close(
        parts["negative"], (1 - p_positive)[:, None] * mean_negative / (n * tau), **EXACT
    )


def test_info_nce_hand_case_two_orthogonal_samples():
    # q1 = k1 = (1, 0), q2 = k2 = (0, 1), τ = 1: query 1's logits (1, 0), p⁺ = e/(e + 1), so
    # ∂L/∂q1 = ½(−(1 − p⁺) k1 + p_2 k2) with 1 − p⁺ = p_2 = 1/(1 + e); query 2 mirrored.
    e = torch.eye(2, dtype=torch.float64)
    parts = info_nce_parts(e, e, torch.arange(2), temperature=1.0)
    s = 1 / (1 + math.e)
    positive = torch.tensor([[-s / 2, 0.0], [0.0, -s / 2]], dtype=torch.float64)
    negative = torch.tensor([[0.0, s / 2], [s / 2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(parts["positive"], positive, **EXACT)
    torch.testing.assert_close(parts["negative"], negative, **EXACT)


def test_invariant_spreading_parts_sum_to_the_anchor_gradient_with_detached_keys():
    n, d, tau = 4, 5, 0.5
    x = unit(2 * n, d, seed=9)
    expected = autograd_of(lambda u: losses.invariant_spreading(u, x, tau), x)
    torch.testing.assert_close(total(invariant_spreading_parts(x, x, tau)), expected, **EXACT)


def test_barlow_twins_parts_sum_to_the_gradient_of_its_loss_on_the_standardised_views():
    n, d, weight = 10, 6, 0.3
    generator = torch.Generator().manual_seed(10)
    z1, z2 = (torch.randn(n, d, generator=generator, dtype=torch.float64) for _ in range(2))
    z1, z2 = ((z - z.mean(0)) / z.std(0, correction=0) for z in (z1, z2))  # ẑ: C as the loss's
    expected = autograd_of(lambda u: losses.barlow_twins(u.T @ z2 / n, weight), z1)
    torch.testing.assert_close(total(barlow_twins_parts(z1, z2, weight)), expected, **EXACT)


def test_vicreg_parts_sum_to_the_gradient_of_its_weighted_terms():
    n, d = 12, 5
    weights = {"invariance": 25.0, "variance": 25.0, "covariance": 1.0}
    generator = torch.Generator().manual_seed(11)
    scales = torch.tensor([0.3, 0.7, 1.5, 2.0, 0.5], dtype=torch.float64)  # hinge on and off
    z1, z2 = (torch.randn(n, d, generator=generator, dtype=torch.float64) * scales for _ in (1, 2))

    def loss(u):
        s, v, c = losses.vicreg_terms(u, z2)
        return weights["invariance"] * s + weights["variance"] * v + weights["covariance"] * c

    parts = vicreg_parts(z1, z2, *weights.values())
    assert set(parts) == {"positive", "self", "variance", "covariance"}
    assert parts["variance"].abs().sum() > 0 and parts["variance"][:, 3].abs().sum() == 0
    # vicreg_terms computes in float32 (its docstring): agreement to float32 precision only
    torch.testing.assert_close(total(parts), autograd_of(loss, z1), rtol=1e-5, atol=1e-6)


def test_cosine_parts_sum_to_simsiam_and_half_byol_gradients_and_are_orthogonal_to_p():
    n, d = 6, 4
    generator = torch.Generator().manual_seed(12)
    p, t = (torch.randn(n, d, generator=generator, dtype=torch.float64) * 3 for _ in (1, 2))
    parts = cosine_parts(p, t)
    torch.testing.assert_close(
        total(parts), autograd_of(lambda u: losses.negative_cosine(u, t), p), **EXACT
    )
    byol = autograd_of(lambda u: losses.regression(u, t), p)
    torch.testing.assert_close(2 * total(parts), byol, **EXACT)
    # the loss ignores |p|: the radial part cancels the positive's component along p
    torch.testing.assert_close(
        (total(parts) * p).sum(dim=1), torch.zeros(n, dtype=p.dtype), **EXACT
    )


def test_unigrad_parts_sum_to_the_gradient_of_its_loss():
    n, d, balance = 5, 4, 3.0
    u, t, v = unit(n, d, seed=13), unit(n, d, seed=14), unit(20, d, seed=15)
    correlation = v.T @ v / 20
    expected = autograd_of(lambda x: losses.unigrad(x, t, correlation, balance), u)
    parts = unigrad_parts(u, t, correlation, balance)
    torch.testing.assert_close(total(parts), expected, **EXACT)
    torch.testing.assert_close(parts["negative"], balance * u @ correlation / n, **EXACT)


def test_scalars_of_unigrad_with_identity_correlation_and_aligned_views():
    # u = u⁺ and F = I: positive −u⁺/N, negative λu/N; the step is (λ − 1)u⁺/N.
    u = unit(4, 3, seed=16)
    scalars = gradient_scalars(unigrad_parts(u, u, torch.eye(3, dtype=u.dtype), 0.25), u)
    assert scalars["pos_norm"] == pytest.approx(1.0)
    assert scalars["neg_norm"] == pytest.approx(0.25)
    assert scalars["balance"] == pytest.approx(0.25)
    assert scalars["cos_pos_neg"] == pytest.approx(-1.0)
    assert scalars["cos_total_target"] == pytest.approx(1.0)  # λ < 1: a net pull to u⁺
    assert "negative_norm" not in scalars  # one non-positive part: it is neg_norm


def test_scalars_report_each_vicreg_part():
    z1, z2 = unit(8, 4, seed=17), unit(8, 4, seed=18)
    scalars = gradient_scalars(vicreg_parts(z1, z2, 25.0, 25.0, 1.0), z2)
    assert {"self_norm", "variance_norm", "covariance_norm"} <= set(scalars)


class TinyBackbone(torch.nn.Module):
    """Flatten + Linear: a backbone with num_features, cheap enough to run every method."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 4 * 4, self.num_features)

    def forward(self, x):
        return self.linear(x.flatten(1))


def standardised(z):  # as losses.cross_correlation: biased variance, eps 1e-5 inside the root
    return (z - z.mean(0)) / (z.var(0, correction=0) + 1e-5).sqrt()


METHOD_CASES = {  # method kwargs, the module whose output u is computed from, u of that output
    "moco": ({"dim": 6, "mlp_hidden": 16, "queue_size": 20, "shuffle_bn_groups": 1}, "projector",
             lambda z: F.normalize(z, dim=1)),
    "moco_v3": ({"dim": 6, "hidden": 16, "temperature": 0.3}, "predictor",
                lambda z: F.normalize(z, dim=1)),
    "invaspread": ({"dim": 6}, "projector", lambda z: F.normalize(z, dim=1)),
    "byol": ({"dim": 6, "hidden": 16}, "predictor", lambda z: z),
    "simsiam": ({"dim": 6, "hidden": 16, "predictor_hidden": 4}, "predictor", lambda z: z),
    "barlow_twins": ({"dim": 6, "hidden": 16, "off_diagonal_weight": 0.1}, "projector",
                     standardised),
    "vicreg": ({"dim": 6, "hidden": 16}, "projector", lambda z: z),
    "unigrad": ({"dim": 6, "hidden": 16, "balance": 5.0}, "projector",
                lambda z: F.normalize(z, dim=1)),
}  # fmt: skip


# train.target=momentum: the targets come from a momentum network (no gradient), so the method's
# split is exact for SimCLR too, whose published loss also sends gradient through the candidates.
MOMENTUM_CASES = {
    "simclr": ({"dim": 6, "hidden": 16, "temperature": 0.5}, "projector",
               lambda z: F.normalize(z, dim=1)),
    **{name: METHOD_CASES[name] for name in ("simsiam", "barlow_twins", "vicreg")},
}  # fmt: skip
CASES = [(name, "method") for name in METHOD_CASES] + [(n, "momentum") for n in MOMENTUM_CASES]


def test_every_method_with_gradient_terms_is_checked_against_autograd():
    assert with_gradient_terms() == sorted({*METHOD_CASES, *MOMENTUM_CASES})
    assert not METHODS.get("dino").has_gradient_terms()


@pytest.mark.parametrize(("name", "setting"), CASES)
def test_gradient_terms_sum_to_the_gradient_the_methods_own_loss_sends(name, setting):
    # The method's forward and backward in double; a hook keeps the gradient at the output that
    # gradient_terms' u is computed from, and its ∂L/∂u carried back through that map must equal
    # it: gradient_terms takes u, the targets and the loss weights as the method's forward does.
    kwargs, module, to_u = (METHOD_CASES if setting == "method" else MOMENTUM_CASES)[name]
    torch.manual_seed(0)
    method = METHODS.get(name)(TinyBackbone(), **kwargs).double()
    if setting == "momentum":
        use_target_setting(method, "momentum", 0.9)
        with torch.no_grad():  # a momentum network that differs from the online one
            for parameter in method.parameters():
                if not parameter.requires_grad:
                    parameter.add_(0.01 * torch.randn_like(parameter))
    method.train()
    if name == "unigrad":  # a stored F, as after some steps
        v = unit(30, 6, seed=19)
        method.correlation.copy_(v.T @ v / 30)
        method.correlation_started.fill_(True)
    x1, x2 = torch.rand(2, 10, 3, 4, 4, generator=torch.Generator().manual_seed(20)).double()
    views = Views([x1, x2], [], torch.arange(10))
    outputs = []

    def keep(module, inputs, out):
        out.retain_grad()
        outputs.append(out)

    handle = getattr(method, module).register_forward_hook(keep)
    method(views, Progress(0, 0.0, 0.0))["loss"].backward()
    handle.remove()
    with torch.no_grad():
        terms = [(parts, target) for prefix, parts, target in method.gradient_terms(views)
                 if prefix == ""]  # fmt: skip
    assert len(terms) == len(outputs)
    for (parts, _), out in zip(terms, outputs, strict=True):
        z = out.detach().requires_grad_()
        carried = torch.autograd.grad(to_u(z), z, total(parts))[0]
        # Barlow Twins and VICReg compute their losses in float32 (their docstrings)
        tolerance = {"rtol": 1e-5, "atol": 1e-7} if name in ("barlow_twins", "vicreg") else EXACT
        torch.testing.assert_close(carried, out.grad, **tolerance)


def tiny_config(root, method):
    return {
        "method": method,
        "backbone": {"name": "resnet18", "stem": "small", "width": 0.125},
        "data": {"name": "synthetic", "per_class": 8, "size": 16},
        "views": {"name": "simclr", "size": 8, "blur_p": 0.0, "scale": [0.4, 1.0]},
        "optim": {"name": "sgd", "lr": 0.1, "batch_size": 16},
        "train": {
            "epochs": 1,
            "max_steps": 1,
            "out_dir": str(root),
            "name": method["name"],
            "progress": False,
            "knn_every": 0,
            "collapse_guard": False,
        },
    }


def tiny_run(root, method):
    return selfsup.train(resolve(tiny_config(root, method)))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "simclr": tiny_run(root, {"name": "simclr", "hidden": 32, "dim": 16, "temperature": 0.5}),
        "byol": tiny_run(root, {"name": "byol", "hidden": 32, "dim": 16}),
    }


def test_run_level_decomposition_of_simclr_and_byol(tiny_runs):
    for name, run in tiny_runs.items():
        result = gradient_decomposition(run.path, batches=2, device="cpu")
        assert result["method"] == name and result["batches"] == 2 and result["batch_size"] == 16
        assert json.loads((run.path / "gradients.json").read_text()) == result
        for key in ("pos_norm", "neg_norm", "balance", "cos_pos_neg", "cos_total_target"):
            assert math.isfinite(result[key])
        assert result["pos_norm"] > 0 and result["neg_norm"] > 0
        # InfoNCE: |negative|/|positive| = |p-weighted mean of unit negatives| <= 1; the cosine
        # loss: |radial|/|positive| = |cos(p, t)| <= 1
        assert result["balance"] <= 1 + 1e-6
    byol = json.loads((tiny_runs["byol"].path / "gradients.json").read_text())
    assert math.isfinite(byol["projection_balance"]) and "projection_balance" not in json.loads(
        (tiny_runs["simclr"].path / "gradients.json").read_text()
    )


def test_gradients_command_prints_runs_side_by_side(tiny_runs, capsys):
    paths = [str(run.path) for run in tiny_runs.values()]
    assert main(["gradients", *paths, "--batches", "1", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["simclr", "byol"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["method"] == ["simclr", "byol"]
    assert rows["projection_balance"][0] == "-" and rows["projection_balance"][1] != "-"


def test_unsupported_method_names_the_supported_ones(tmp_path, capsys):
    run = tmp_path / "dino-run"
    run.mkdir()
    config = resolve(tiny_config(tmp_path, {"name": "dino"}))
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (run / "data.json").write_text("{}")
    supported = ", ".join(with_gradient_terms())
    with pytest.raises(ValueError, match=f"method 'dino' is not supported; supported: {supported}"):
        gradient_decomposition(run)
    assert main(["gradients", str(run)]) == 2
    assert "supported: " + supported in capsys.readouterr().err
    assert not Path(run / "gradients.json").exists()


def test_training_logs_the_decomposition_every_n_steps_and_trains_exactly_as_without(tiny_config):
    """train.gradients_every: lines in metrics.jsonl at the asked steps, and the training itself
    unchanged (same final weights: the monitor restores the RNG and batch norm statistics)."""
    tiny_config["train"].update(epochs=1, knn_every=0, name="plain")
    plain = selfsup.train(resolve(tiny_config))
    tiny_config["train"].update(gradients_every=3, name="logged")
    logged = selfsup.train(resolve(tiny_config))
    lines = [r for r in logged.metrics if r.get("event") == "gradients"]
    steps = max(r["step"] for r in logged.metrics if "step" in r)
    assert [r["step"] for r in lines] == list(range(3, steps + 1, 3))
    for r in lines:
        assert r["pos_norm"] > 0 and r["balance"] == pytest.approx(r["neg_norm"] / r["pos_norm"])
    a = selfsup.load(plain.path).method.state_dict()
    b = selfsup.load(logged.path).method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradients_every_refuses_a_method_without_a_decomposition(tiny_config):
    tiny_config["method"] = {"name": "dino", "out_dim": 16, "hidden": 16, "bottleneck": 8}
    tiny_config["train"].update(gradients_every=5)
    with pytest.raises(ValueError, match="train.gradients_every: the gradient decomposition"):
        selfsup.train(resolve(tiny_config))
