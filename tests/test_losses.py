"""Cluster and separation costs against the paper's definitions, computed image by image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protopnet.losses import LossCoefficients, average_separation, cluster_cost, l1_wrong_class, protopnet_loss, separation_cost


def identity(classes: list[int], k: int) -> torch.Tensor:
    eye = torch.zeros(len(classes), k)
    eye[torch.arange(len(classes)), torch.tensor(classes)] = 1
    return eye


def loop_costs(min_d, labels, classes):
    clst, sep, avg = [], [], []
    for i in range(min_d.shape[0]):
        own = [min_d[i, j] for j in range(len(classes)) if classes[j] == labels[i]]
        other = [min_d[i, j] for j in range(len(classes)) if classes[j] != labels[i]]
        clst.append(min(own))
        sep.append(min(other))
        avg.append(sum(other) / len(other))
    return torch.stack(clst).mean(), torch.stack(sep).mean(), torch.stack(avg).mean()


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_cluster_and_separation_match_the_paper(scale):
    g = torch.Generator().manual_seed(1)
    classes = [0, 0, 1, 1, 2, 2, 2]
    min_d = torch.rand(9, 7, generator=g) * scale
    labels = torch.randint(0, 3, (9,), generator=g)
    eye = identity(classes, 3)
    clst, sep, avg = loop_costs(min_d, labels.tolist(), classes)
    torch.testing.assert_close(cluster_cost(min_d, labels, eye), clst)
    torch.testing.assert_close(separation_cost(min_d, labels, eye), sep)
    torch.testing.assert_close(average_separation(min_d, labels, eye), avg)


def test_cluster_gradient_flows_only_to_the_nearest_own_class_prototype():
    classes = [0, 0, 1]
    min_d = torch.tensor([[0.3, 0.1, 0.05]], requires_grad=True)
    cluster_cost(min_d, torch.tensor([0]), identity(classes, 2)).backward()
    assert min_d.grad.tolist() == [[0.0, 1.0, 0.0]]


def test_cluster_over_every_prototype_averages_each_own_class_prototypes_distance():
    g = torch.Generator().manual_seed(2)
    classes = [0, 0, 1, 1, 1]  # class 2 has no prototype (pruned away)
    min_d = torch.rand(6, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 1])
    expected = []
    for i, label in enumerate(labels.tolist()):
        own = [min_d[i, j] for j in range(len(classes)) if classes[j] == label]
        expected.append(sum(own) / len(own) if own else torch.tensor(0.0))
    torch.testing.assert_close(cluster_cost(min_d, labels, identity(classes, 3), over="every"), torch.stack(expected).mean())
    # every own-class prototype gets its share of the gradient, the other class's none
    d = torch.tensor([[0.3, 0.1, 0.05]], requires_grad=True)
    cluster_cost(d, torch.tensor([0]), identity([0, 0, 1], 2), over="every").backward()
    assert d.grad.tolist() == [[0.5, 0.5, 0.0]]
    with pytest.raises(ValueError, match="'nearest', 'every'"):
        cluster_cost(d, torch.tensor([0]), identity([0, 0, 1], 2), over="all")


def test_l1_counts_only_wrong_class_weights():
    classes = [0, 1, 1]
    w = torch.tensor([[5.0, -2.0, 3.0], [-7.0, 11.0, 13.0]])  # (K=2, M=3)
    assert l1_wrong_class(w, identity(classes, 2)).item() == 2.0 + 3.0 + 7.0


def test_total_loss_uses_the_coefficients_with_separation_subtracted():
    g = torch.Generator().manual_seed(2)
    classes = [0, 1, 2]
    eye = identity(classes, 3)
    logits = torch.randn(4, 3, generator=g)
    min_d = torch.rand(4, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0])
    w = torch.randn(3, 3, generator=g)
    c = LossCoefficients()
    assert (c.ce, c.cluster, c.separation, c.l1) == (1.0, 0.8, -0.08, 1e-4)
    loss, terms = protopnet_loss(logits, min_d, labels, eye, w, c)
    expected = (
        F.cross_entropy(logits, labels)
        + 0.8 * cluster_cost(min_d, labels, eye)
        - 0.08 * separation_cost(min_d, labels, eye)
        + 1e-4 * l1_wrong_class(w, eye)
    )
    torch.testing.assert_close(loss, expected)
    assert set(terms) == {"ce", "l1", "cluster", "separation", "avg_separation", "loss"}
    last_only, terms = protopnet_loss(logits, min_d, labels, eye, w, c, use_cluster_separation=False)
    torch.testing.assert_close(last_only, F.cross_entropy(logits, labels) + 1e-4 * l1_wrong_class(w, eye))


def test_the_config_names_a_bad_cluster_over():
    from protopnet.config import Config, ConfigError

    assert Config.from_dict({}, ["loss.cluster_over=every"]).loss.cluster_over == "every"
    with pytest.raises(ConfigError, match="loss.cluster_over: expected 'nearest'.*got 'all'"):
        Config.from_dict({}, ["loss.cluster_over=all"])
