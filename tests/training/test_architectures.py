from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fpn_serve.runtime.solvers import anderson as numpy_anderson
from training import architectures
from training.architectures import available, build_parts
from training.config import ModelConfig
from training.fpn import FPN
from training.solvers import anderson, fixed_point, measured_contraction

# the paper's model sizes (Table 1) and the tolerance we allow around them
PAPER_SIZES = {
    "mnist_fc": 84_000,
    "mnist_conv": 84_182,
    "svhn_conv": 154_000,
    "cifar10_conv": 172_000,
    "cifar10_resnet": 860_000,
}


def config(arch: str, gamma: float = 0.99) -> ModelConfig:
    a = architectures.get(arch)
    return ModelConfig(arch=arch, gamma=gamma, latent_dim=a.latent_dim, in_channels=a.input_shape[0])


def test_mnist_conv_has_the_papers_parameter_count() -> None:
    assert FPN(ModelConfig(arch="mnist_conv")).num_parameters() == 84_182


@pytest.mark.parametrize("arch", sorted(PAPER_SIZES))
def test_every_architecture_has_the_papers_size_and_runs_on_its_input(arch: str) -> None:
    model = FPN(config(arch)).eval()
    assert abs(model.num_parameters() - PAPER_SIZES[arch]) <= 0.01 * PAPER_SIZES[arch]
    x = torch.randn(3, *architectures.get(arch).input_shape)
    logits, info = model(x, tol=1e-4, max_iter=200)
    assert logits.shape == (3, 10) and bool(info.converged.all())
    z = model.Q(x)
    assert model.T.explicit(z).shape == z.shape


def test_every_paper_architecture_is_registered_and_unknown_names_list_them() -> None:
    assert set(PAPER_SIZES) <= set(available())
    with pytest.raises(ValueError, match="available: cifar10_conv, cifar10_resnet, mnist_conv, mnist_fc, svhn_conv"):
        build_parts(ModelConfig(arch="resnet9000"))


def test_an_architecture_refuses_data_with_other_channels() -> None:
    with pytest.raises(ValueError, match="3-channel"):
        build_parts(ModelConfig(arch="svhn_conv", latent_dim=100, in_channels=1))


@pytest.mark.parametrize("arch", ["mnist_fc", "mnist_conv", "svhn_conv", "cifar10_conv"])
@pytest.mark.parametrize("gamma", [0.5, 0.99])
def test_contraction_holds_after_aggressive_optimiser_steps(arch: str, gamma: float) -> None:
    """Push the raw weights far outside the unit ball; every T must stay gamma-Lipschitz in u."""
    torch.manual_seed(0)
    model = FPN(config(arch, gamma))
    n = model.config.latent_dim
    opt = torch.optim.SGD(model.T.parameters(), lr=10.0)
    for _ in range(5):
        u, z = torch.randn(2, 64, n).unbind(0)
        loss = -model.T(u, z).norm()  # grows the weights without bound
        opt.zero_grad()
        loss.backward()
        opt.step()
    raw = [p for name, p in model.T.named_parameters() if name.endswith("raw")]
    assert max(float(torch.linalg.matrix_norm(p.detach(), ord=2)) for p in raw) > 2.0  # the raw weights really grew
    bound = model.T.lipschitz_bound()
    assert bound <= gamma * (1 + 1e-6)
    with torch.no_grad():
        u1, u2, z = (3 * torch.randn(3, 4096, n)).unbind(0)
        lhs = (model.T(u1, z) - model.T(u2, z)).norm(dim=1)
        assert bool((lhs <= bound * (u1 - u2).norm(dim=1) * (1 + 1e-5)).all())
        weights = model.T.weights()
    measured = measured_contraction(lambda u: model.T.apply_with(weights, u, z[:256]), u1[:256])
    assert 0 < measured <= bound * (1 + 1e-4)


def test_measured_contraction_finds_the_largest_singular_value() -> None:
    torch.manual_seed(1)
    a = torch.randn(20, 20)
    a = 0.7 * a / torch.linalg.matrix_norm(a, ord=2)
    points = torch.randn(8, 20)
    assert measured_contraction(lambda u: u @ a.T, points, iters=200) == pytest.approx(0.7, rel=1e-3)
    # through a ReLU the local factor is that of the rows still active: never above the global one
    local = measured_contraction(lambda u: torch.relu(u @ a.T), points, iters=200)
    assert local <= 0.7 * (1 + 1e-4)


def test_gamma_outside_unit_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="gamma"):
        FPN(ModelConfig(gamma=1.0))


def _contraction_map(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric map with eigenvalues spread over [-0.5, 0.99]: slow for plain iteration."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen))
    w = q @ torch.diag(torch.linspace(-0.5, 0.99, 30)) @ q.T
    z = torch.randn(16, 30, generator=gen)
    return w, z


def test_anderson_reaches_the_same_fixed_point_in_fewer_iterations() -> None:
    w, z = _contraction_map(2)

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(u @ w.T + z)

    u0 = torch.zeros_like(z)
    plain, plain_info = fixed_point(f, u0, 1e-6, 1000)
    fast, fast_info = anderson(f, u0, 1e-6, 1000)
    assert bool(plain_info.converged.all()) and bool(fast_info.converged.all())
    # both stop within gamma / (1 - gamma) * step (about 1e-4 here) of the true fixed point
    assert float((fast - plain).norm(dim=1).max()) < 1e-3
    assert float(fast_info.iterations.float().mean()) < 0.6 * float(plain_info.iterations.float().mean())


def test_torch_anderson_matches_the_serving_anderson() -> None:
    """Training and serving run one algorithm: same iterations per sample, same answer."""
    w, z = _contraction_map(3)
    torch_u, info = anderson(lambda u: torch.tanh(u @ w.T + z), torch.zeros_like(z), 1e-5, 200)
    wn, zn = w.numpy(), z.numpy()
    out = numpy_anderson(lambda u, zz: np.tanh(u @ wn.T + zz).astype(np.float32), zn, 1e-5, 200)
    np.testing.assert_array_equal(out.iterations, info.iterations.numpy())
    np.testing.assert_allclose(out.u, torch_u.numpy(), atol=1e-4)


def test_anderson_reports_non_convergence_at_max_iter() -> None:
    """A map that is not a contraction (here a rotation) stops at max_iter with converged false."""
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    _, info = anderson(lambda u: u @ rot.T + 1.0, torch.zeros(4, 2), 1e-6, 7)
    assert info.iterations.tolist() == [7] * 4 and not bool(info.converged.any())


@pytest.mark.parametrize("arch", ["mnist_fc", "svhn_conv", "cifar10_conv", "cifar10_resnet"])
def test_every_architecture_exports_graphs_that_match_torch(arch: str, tmp_path: Path) -> None:
    """Q, T and S of each architecture run in ONNX Runtime as in torch (BatchNorm in eval mode too)."""
    import onnxruntime as ort

    from training.export import write_graphs

    torch.manual_seed(0)
    model = FPN(config(arch)).eval()
    shape = architectures.get(arch).input_shape
    write_graphs(model, shape, tmp_path, arch, 18, "fp32", loop=False)
    x = torch.randn(5, *shape)
    with torch.no_grad():
        z = model.Q(x)
        u = torch.randn_like(z)
        expected = {"Q": model.Q(x), "T": model.T(u, z), "S": model.S(u)}
    feeds = {"Q": {"x": x.numpy()}, "T": {"u": u.numpy(), "z": z.numpy()}, "S": {"u": u.numpy()}}
    for role, want in expected.items():
        sess = ort.InferenceSession(str(tmp_path / f"{role}.onnx"), providers=["CPUExecutionProvider"])
        (got,) = sess.run(None, feeds[role])
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{arch} {role}")
