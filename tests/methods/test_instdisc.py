"""InstDisc: NCE against eq. 6 by hand, the fixed normalising constant Z, the memory bank,
the full-softmax variant, the proximal term, one view per image, training."""

import math

import numpy as np
import torch
import torch.nn.functional as F

import selfsup
from selfsup.config import resolve
from selfsup.losses import nce
from selfsup.methods.instdisc import InstDisc
from selfsup.step import Progress, Views

N, BANK, K, TAU = 6, 20, 5, 0.07


def _method(backbone, **kwargs):
    method = InstDisc(backbone, num_samples=BANK, dim=4, num_noise=K, temperature=TAU, **kwargs)
    with torch.no_grad():  # unit bank rows, as after the first epoch
        method.bank.features.copy_(F.normalize(method.bank.features, dim=1))
    return method


def _fixed_noise(method, seed=3):
    """Make the noise draw known: bank.sample returns these (N, K) indices."""
    noise = torch.randint(BANK, (N, K), generator=torch.Generator().manual_seed(seed))
    method.bank.sample = lambda shape, generator=None: noise
    return noise


def _features(method, x):
    with torch.no_grad():
        return F.normalize(method.projector(method.backbone(x)), dim=1)


def _dot(u, v):
    return sum(a * b for a, b in zip(u.tolist(), v.tolist(), strict=True))


INDEX = torch.tensor([0, 3, 4, 7, 11, 19])


def test_nce_matches_eq_6_written_out_with_the_noise_probability_one_over_n():
    generator = torch.Generator().manual_seed(0)
    positive, noise = torch.randn(4, generator=generator), torch.randn(4, 7, generator=generator)
    z, n = 3.5, 50
    expected = 0.0
    for b in range(4):  # h = P/(P + K·P_n), P = exp(logit)/Z, P_n = 1/n
        p = math.exp(positive[b]) / z
        expected -= math.log(p / (p + 7 / n))
        for k in range(7):
            p = math.exp(noise[b, k]) / z
            expected -= math.log(1 - p / (p + 7 / n))
    loss = nce(positive, noise, torch.tensor(math.log(z)), 1 / n)
    assert math.isclose(loss.item(), expected / 4, rel_tol=1e-5)


def test_normalising_constant_is_n_times_the_mean_exp_similarity_and_the_loss_is_eq_6(
    tiny_backbone, two_views, progress
):
    method = _method(tiny_backbone)
    noise = _fixed_noise(method)
    out = method(Views(two_views[:1], index=INDEX), progress)
    f, bank = _features(method, two_views[0]), method.bank.features
    total = 0.0
    for b in range(N):  # over the batch's 1 + K bank entries: its own and the noise
        for j in [INDEX[b].item(), *noise[b].tolist()]:
            total += math.exp(_dot(bank[j], f[b]) / TAU)
    z = BANK * total / (N * (K + 1))  # Z ≈ n/m Σ_j exp(v_j·f/τ)
    assert math.isclose(out["nce_z"].item(), z, rel_tol=1e-5) and "pos_sim" in out
    expected = 0.0
    for b in range(N):
        p = math.exp(_dot(bank[INDEX[b]], f[b]) / TAU) / z
        expected -= math.log(p / (p + K / BANK))  # P_n(i) = 1/n
        for j in noise[b].tolist():
            p = math.exp(_dot(bank[j], f[b]) / TAU) / z
            expected -= math.log(1 - p / (p + K / BANK))
    assert math.isclose(out["loss"].item(), expected / N, rel_tol=1e-4)


def test_normalising_constant_is_set_after_the_first_step_then_fixed_and_resumed(
    tiny_backbone, two_views, progress
):
    method = _method(tiny_backbone)
    out = method(Views(two_views[:1], index=INDEX), progress)
    assert method.normaliser.item() < 0  # forward has no side effect: still unset
    with torch.no_grad():
        method.after_step(progress, out)
    z = out["nce_z"].item()
    assert method.normaliser.item() == z
    for step, x in enumerate([two_views[1], two_views[0] * 2], start=1):
        out = method(Views([x], index=INDEX.flip(0)), Progress(step, 0.0, 0.0))
        assert out["nce_z"].item() == z  # not re-estimated on later batches
        with torch.no_grad():
            method.after_step(progress, out)
        assert method.normaliser.item() == z
    resumed = _method(type(tiny_backbone)())
    assert resumed.normaliser.item() < 0
    resumed.load_state_dict(method.state_dict())
    assert resumed.normaliser.item() == z
    out = resumed(Views(two_views[:1], index=INDEX), progress)
    assert out["nce_z"].item() == z


def test_bank_rows_of_the_batch_move_by_momentum_and_stay_unit_norm(
    tiny_backbone, two_views, progress
):
    method = _method(tiny_backbone)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    expected = method.bank.features.clone()
    batches = [(two_views[0], INDEX), (two_views[1], torch.tensor([1, 3, 5, 7, 9, 11]))]
    for x, index in batches * 2:  # rows 3, 7, 11 are written in every step
        f = _features(method, x)
        out = method(Views([x], index=index), progress)
        torch.testing.assert_close(out["embedding"], f)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        with torch.no_grad():
            method.after_step(progress, out)
        for row, i in enumerate(index.tolist()):  # v ← (m·v + (1 − m)·f)/‖·‖, m = 0.5
            v = 0.5 * expected[i] + 0.5 * f[row]
            expected[i] = v / v.norm()
        torch.testing.assert_close(method.bank.features, expected)
    written = torch.tensor([0, 1, 3, 4, 5, 7, 9, 11, 19])
    torch.testing.assert_close(method.bank.features[written].norm(dim=1), torch.ones(9))


def test_softmax_variant_is_minus_log_softmax_over_the_whole_bank(
    tiny_backbone, two_views, progress
):
    method = _method(tiny_backbone, loss="softmax")
    out = method(Views(two_views[:1], index=INDEX), progress)
    f, bank = _features(method, two_views[0]), method.bank.features
    expected = 0.0
    for b in range(N):  # P(i|f) = exp(v_i·f/τ) / Σ_{j=1..n} exp(v_j·f/τ)  (eq. 2)
        denominator = sum(math.exp(_dot(bank[j], f[b]) / TAU) for j in range(BANK))
        expected -= math.log(math.exp(_dot(bank[INDEX[b]], f[b]) / TAU) / denominator)
    assert math.isclose(out["loss"].item(), expected / N, rel_tol=1e-5)
    assert "nce_z" not in out


def test_proximal_term_adds_lambda_times_the_distance_to_the_bank_entry(
    tiny_backbone, two_views, progress
):
    plain = _method(tiny_backbone)
    regularised = _method(tiny_backbone, proximal=30.0)
    regularised.load_state_dict(plain.state_dict())
    _fixed_noise(plain), _fixed_noise(regularised)
    views = Views(two_views[:1], index=INDEX)
    difference = regularised(views, progress)["loss"] - plain(views, progress)["loss"]
    f, bank = _features(plain, two_views[0]), plain.bank.features
    distance = sum(((f[b] - bank[INDEX[b]]) ** 2).sum().item() for b in range(N)) / N
    assert math.isclose(difference.item(), 30.0 * distance, rel_tol=1e-4)


def test_only_the_first_view_is_used(tiny_backbone, two_views, progress):
    method = _method(tiny_backbone)
    _fixed_noise(method)
    one = method(Views(two_views[:1], index=INDEX), progress)["loss"]
    poisoned = Views([two_views[0], torch.full_like(two_views[1], float("nan"))], index=INDEX)
    assert torch.equal(method(poisoned, progress)["loss"], one)


def test_instdisc_training_pulls_features_to_their_entries_and_learns_above_chance(tiny_config):
    # On this tiny set the NCE loss itself rises while the features learn: each class is a few
    # near-duplicates, so ~10 % of the noise entries are same-class images whose similarity grows
    # with the class structure kNN rewards, and Z stays at its random-bank estimate. What must
    # improve is each image's agreement with its own bank entry (pos_sim) and the kNN accuracy.
    tiny_config["method"] = {"name": "instdisc", "dim": 32, "num_noise": 32, "temperature": 0.1}
    tiny_config["views"] = {"name": "moco_v1", "size": 16, "scale": [0.4, 1.0], "num_views": 1}
    tiny_config["optim"].update(lr=0.03, warmup_epochs=0)
    tiny_config["train"].update(epochs=4, knn_every=4)
    run = selfsup.train(resolve(tiny_config))
    agreement = [r["pos_sim"] for r in run.metrics if "pos_sim" in r]
    assert np.mean(agreement[-3:]) > np.mean(agreement[:3]) + 0.3, agreement
    assert [r["knn_top1"] for r in run.metrics if "knn_top1" in r][-1] > 30  # chance: 10 %


def test_instdisc_softmax_training_lowers_the_loss(tiny_config):
    tiny_config["method"] = {"name": "instdisc", "dim": 32, "loss": "softmax"}
    tiny_config["views"] = {"name": "moco_v1", "size": 16, "scale": [0.4, 1.0], "num_views": 1}
    tiny_config["optim"].update(lr=0.3, warmup_epochs=0)
    tiny_config["train"].update(epochs=4, knn_every=4)
    run = selfsup.train(resolve(tiny_config))
    losses = [r["loss"] for r in run.metrics if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0, losses
    assert [r["knn_top1"] for r in run.metrics if "knn_top1" in r][-1] > 20  # chance: 10 %
