"""`ekfac` against kronfluence 1.0.1's EK-FAC scores on a tiny MLP; skipped without kronfluence.

kronfluence is not a ``[dev]`` extra: it declares torchvision, and PyPI's torchvision 0.28.0 (the one matching
torch 2.13) is a CUDA build whose operators fail to register against the CPU torch ("operator torchvision::nms
does not exist"), after which transformers cannot import (LlamaConfig). kronfluence itself never imports
torchvision, so install it without: ``pip install --no-deps kronfluence==1.0.1 accelerate einops einconv``.
kronfluence's empirical-Fisher mode is deterministic, so ``fisher: empirical`` must agree with it (fp64
everywhere, absolute damping)."""
from __future__ import annotations

import pytest
import torch

kronfluence = pytest.importorskip("kronfluence")

from plait.plugins.sam_if.ekfac import EKFACEstimator  # noqa: E402

LAM = 1e-2


class _Task(kronfluence.task.Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def test_ekfac_matches_kronfluence_on_a_tiny_mlp(tmp_path):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    ours = EKFACEstimator(damping=LAM, fisher="empirical").scores(model, (X[:32], y[:32]), (X[32:], y[32:]))

    train = torch.utils.data.TensorDataset(X[:32], y[:32])
    query = torch.utils.data.TensorDataset(X[32:], y[32:])
    task = _Task()
    kmodel = prepare_model(model, task)
    an = Analyzer("t", kmodel, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
    f64 = torch.float64
    fa = FactorArguments(strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=f64,
                         gradient_covariance_dtype=f64, eigendecomposition_dtype=f64, lambda_dtype=f64,
                         per_sample_gradient_dtype=f64)
    an.fit_all_factors("f", train, per_device_batch_size=8, factor_args=fa, overwrite_output_dir=True)
    sa = ScoreArguments(damping_factor=LAM, per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64)
    an.compute_pairwise_scores("s", "f", query, train, per_device_query_batch_size=8, per_device_train_batch_size=8,
                               score_args=sa, overwrite_output_dir=True)
    theirs = an.load_pairwise_scores("s")["all_modules"].T  # [n_train, n_query]
    assert theirs.shape == ours.shape
    assert torch.allclose(ours, theirs.to(ours.dtype), rtol=0, atol=1e-10 * float(theirs.abs().max()))
