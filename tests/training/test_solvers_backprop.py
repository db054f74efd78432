from __future__ import annotations

import pytest
import torch

from training.backprop import get_backprop, jfb
from training.config import ModelConfig
from training.fpn import FPN
from training.solvers import fixed_point, get_solver, residual


def _model(seed: int = 0) -> FPN:
    torch.manual_seed(seed)
    return FPN(ModelConfig(dropout=0.0))


def test_each_sample_stops_on_its_own_residual() -> None:
    model = _model()
    x = torch.randn(8, 1, 28, 28) * torch.linspace(0.1, 3, 8).view(-1, 1, 1, 1)
    with torch.no_grad():
        z = model.Q(x)
        u_batch, info = model.solve(z, 1e-5, 200)
        for i in range(8):
            u_one, one = model.solve(z[i : i + 1], 1e-5, 200)
            assert int(one.iterations) == int(info.iterations[i])
            torch.testing.assert_close(u_one[0], u_batch[i], rtol=0, atol=1e-6)
    assert bool(info.converged.all())
    assert bool((info.residual <= 1e-5).all())


def test_solver_reports_non_convergence_at_max_iter() -> None:
    u0 = torch.ones(3, 4)
    u, info = fixed_point(lambda u: 2 * u, u0, tol=1e-6, max_iter=7)  # expanding: never converges
    assert info.iterations.tolist() == [7, 7, 7]
    assert not bool(info.converged.any())
    torch.testing.assert_close(u, u0 * 2**7)


def test_residual_is_relative_and_per_sample() -> None:
    u = torch.zeros(2, 3)
    u_next = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    r = residual(u_next, u)
    assert r[0] == pytest.approx(1.0, rel=1e-5)
    assert r[1] == 0.0


def test_jfb_gradient_is_the_gradient_through_one_application_of_T() -> None:
    torch.manual_seed(1)
    model = FPN(ModelConfig(dropout=0.3)).train()  # dropout on: Q must be evaluated exactly once
    x = torch.randn(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))

    torch.manual_seed(7)
    logits, _ = jfb(model, x, 1e-5, 200)
    torch.nn.functional.cross_entropy(logits, y).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # Reference: S(T(u*.detach(), Q(d))) built by hand, with u* from a graph-free solve of the
    # same Q(d) (same dropout mask: same seed, one draw).
    torch.manual_seed(7)
    z = model.Q(x)
    u_star, _ = model.solve(z.detach(), 1e-5, 200)
    assert not u_star.requires_grad
    ref_logits = model.S(model.T(u_star.detach(), z))
    torch.nn.functional.cross_entropy(ref_logits, y).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and got[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_registries_name_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="available: anderson, fixed_point"):
        get_solver("newton")
    with pytest.raises(ValueError, match="available: explicit, ift, jfb, unrolled"):
        get_backprop("magic")


@pytest.mark.parametrize("adjoint", ["fixed_point", "cg"])
def test_implicit_gradient_matches_backprop_through_a_long_unrolled_loop(adjoint: str) -> None:
    from training.backprop import AdjointCounter, ift, unrolled

    torch.manual_seed(0)
    model = FPN(ModelConfig(gamma=0.9)).double()
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))

    def gradient(step: object, **kw: object) -> torch.Tensor:
        model.zero_grad()
        logits, _ = step(model, x, 1e-13, 3000, **kw)  # type: ignore[operator]
        torch.nn.functional.cross_entropy(logits, y).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    reference = gradient(unrolled)
    AdjointCounter.products = 0
    implicit = gradient(ift, adjoint=adjoint, adjoint_tol=1e-12, adjoint_max_iter=3000)
    assert AdjointCounter.products > 0
    assert float((implicit - reference).norm() / reference.norm()) <= 1e-4
    # Jacobian-free backprop is an approximation of it, not the same gradient
    assert float((gradient(jfb) - reference).norm() / reference.norm()) > 1e-2


def test_explicit_twin_applies_one_latent_layer() -> None:
    from training.backprop import explicit

    model = _model(2)
    x = torch.randn(4, 1, 28, 28)
    logits, info = explicit(model, x, 1e-4, 50)
    z = model.Q(x)
    torch.testing.assert_close(logits, model.S(model.T(torch.zeros_like(z), z)))
    assert info.iterations.tolist() == [1, 1, 1, 1]


def test_an_explicit_twin_is_evaluated_as_one_layer_not_as_a_fixed_point_network() -> None:
    from training.backprop import explicit
    from training.config import TrainConfig
    from training.data import DATASETS, TensorSplit
    from training.train import evaluate

    model = _model(4)
    gen = torch.Generator().manual_seed(0)
    split = TensorSplit(
        torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8, generator=gen),
        torch.randint(0, 10, (300,), generator=gen),
        DATASETS["mnist"],
    )
    x = split.normalise(split.images)
    with torch.no_grad():
        one_layer = explicit(model.eval(), x, 1e-4, 50)[0].argmax(1)
        solved = model(x, 1e-4, 50)[0].argmax(1)
    assert bool((one_layer != solved).any())  # the two forwards really differ on this model
    result = evaluate(model, split, TrainConfig(backprop="explicit"), "cpu", batch_size=128)
    assert result["test_max_iterations"] == 1
    assert result["test_accuracy"] == pytest.approx(float((one_layer == split.labels).float().mean()))


def test_the_active_set_stops_each_sample_on_its_own_residual_and_keeps_its_value() -> None:
    from fpn_serve.contract import RESIDUAL_EPS
    from training.solvers import ActiveSet

    tol, max_iter = 1e-4, 60
    # sample 0: u <- u / 2 + 1 converges to 2; sample 1: u <- 2 u has residual 1/2 forever
    expected_u, expected_k = 1.0, 0
    while expected_k < max_iter:
        nxt = expected_u / 2 + 1
        expected_k += 1
        r = abs(nxt - expected_u) / (abs(nxt) + RESIDUAL_EPS)
        expected_u = nxt
        if r <= tol:
            break
    scale, shift = torch.tensor([[0.5], [2.0]]), torch.tensor([[1.0], [0.0]])
    u = torch.ones(2, 1)
    stop = ActiveSet(2, tol, u.device)
    for _ in range(max_iter):
        u = stop.advance(scale * u + shift, u, u)
        if stop.done:
            break
    info = stop.info()
    assert 1 < expected_k < max_iter
    assert info.iterations.tolist() == [expected_k, max_iter]
    assert info.converged.tolist() == [True, False]
    assert float(u[0, 0]) == pytest.approx(expected_u, rel=1e-6)  # carried unchanged after it stopped
    assert float(info.residual[1]) == pytest.approx(0.5)


def test_unrolled_backprop_stops_each_sample_where_the_solver_does() -> None:
    from training.backprop import unrolled

    model = _model(3)
    x = torch.randn(6, 1, 28, 28) * torch.linspace(0.1, 3, 6).view(-1, 1, 1, 1)
    logits, info = unrolled(model, x, 1e-5, 200)
    assert logits.requires_grad  # the graph runs through every iteration
    with torch.no_grad():
        u, solved = model.solve(model.Q(x), 1e-5, 200)
    assert info.iterations.tolist() == solved.iterations.tolist()
    assert len(set(info.iterations.tolist())) > 1  # the samples really stopped at different depths
    torch.testing.assert_close(logits.detach(), model.S(u), rtol=0, atol=1e-6)
