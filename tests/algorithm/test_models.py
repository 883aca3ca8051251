"""Model sizes, the theta^f / theta^p split by name, the generator and the diversity loss."""

import torch

from shared.algorithm.distill import diversity_loss
from shared.algorithm.models import (
    Generator,
    build_model,
    count_parameters,
    predictor_params,
    shared_keys,
    split_state,
)


def test_reference_cnn_size_and_split():
    model = build_model("cnn", (1, 28, 28), 10)
    assert count_parameters(model) == 26_434
    assert count_parameters(model.predictor) == 330
    features, predictor = split_state(model.state_dict())
    assert set(predictor) == {"predictor.weight", "predictor.bias"}
    assert all(k.startswith("features.") for k in features)
    assert set(features) | set(predictor) == set(model.state_dict())
    assert set(predictor_params(model.state_dict())) == {"weight", "bias"}


def test_models_produce_logits_and_latents():
    for name in ("cnn", "mlp"):
        model = build_model(name, (1, 28, 28), 10)
        x = torch.randn(5, 1, 28, 28)
        assert model(x).shape == (5, 10)
        assert model.features(x).shape == (5, model.latent_dim)
        assert torch.allclose(model(x), model.predictor(model.features(x)))


def test_shared_keys_full_and_partial():
    state = build_model("cnn", (1, 28, 28), 10).state_dict()
    full = shared_keys(state, partial=False)
    assert "features.1.running_mean" in full  # BatchNorm statistics travel with the model
    assert not any(k.endswith("num_batches_tracked") for k in full)  # integer buffers do not
    assert shared_keys(state, partial=True) == ["predictor.weight", "predictor.bias"]


def test_generator_shapes_and_label_conditioning():
    torch.manual_seed(0)
    gen = Generator(num_classes=10, latent_dim=32, noise_dim=16).eval()
    noise = torch.rand(8, 16)
    labels = torch.arange(8)
    z = gen(noise, labels)
    assert z.shape == (8, 32)
    assert not torch.allclose(z, gen(noise, (labels + 1) % 10))  # the label changes the output


def test_diversity_loss_prefers_diverse_outputs():
    noise = torch.rand(32, 8, generator=torch.Generator().manual_seed(0))
    collapsed = torch.zeros(32, 4)
    assert torch.isclose(diversity_loss(noise, collapsed), torch.tensor(1.0))  # exp(0): the worst value
    # outputs that spread apart as the noise does score lower, and more spread scores lower still
    assert diversity_loss(noise, noise[:, :4] * 10) < diversity_loss(noise, noise[:, :4]) < 1.0
    # hand-computed on two samples: d_noise = mean((0-1)^2, (0-1)^2) = 1, d_z = mean(|0-2|) = 2;
    # the 2x2 matrices have zeros on the diagonal, so mean = (1*2 + 1*2) / 4 = 1
    two = diversity_loss(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0], [2.0]]))
    assert torch.isclose(two, torch.exp(torch.tensor(-1.0)))
