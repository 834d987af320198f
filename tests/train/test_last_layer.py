"""The last-layer stage on cached similarities: same updates as full forward passes, and the
convex optimum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protopnet.losses import l1_wrong_class
from protopnet.train.last_layer import (
    KeptLatents,
    collect_similarities,
    collect_similarities_from_latents,
    optimise_last_layer,
    optimise_last_layer_full_forward,
)
from protopnet.train.push import push_prototypes
from protopnet.train.stages import set_trainable

from conftest import ColourDataset, tiny_model


def test_cached_similarities_equal_a_forward_pass():
    data = ColourDataset(num_classes=3, per_class=4)
    model = tiny_model().eval()
    sims, labels, idx = collect_similarities(model, data, batch_size=5)
    images = torch.stack([data.to_tensor(data.load_image(i)) for i in range(len(data))])
    with torch.no_grad():
        torch.testing.assert_close(sims, model(images).similarities)
    assert labels.tolist() == data.targets and idx.tolist() == list(range(len(data)))


class OneUnreadable(ColourDataset):
    def load_image(self, index):
        if index == 5:
            raise OSError("truncated file")
        return super().load_image(index)


def test_push_keeps_its_latent_maps_and_they_give_the_scans_similarities_bit_for_bit():
    data = OneUnreadable(num_classes=3, per_class=4)
    model = tiny_model(seed=2)
    before = model.prototypes.detach().clone()
    kept = KeptLatents(max_bytes=1e9)
    push_prototypes(model, data, batch_size=5, keep_latents=kept)
    assert kept.complete and not torch.equal(model.prototypes, before)  # push moved the prototypes after the scan
    # the pushed prototypes against the kept maps, and against a second scan of the pictures
    sims, labels, idx = collect_similarities_from_latents(model, kept)
    scanned = collect_similarities(model, data, batch_size=5)
    assert torch.equal(sims, scanned[0]) and torch.equal(labels, scanned[1]) and torch.equal(idx, scanned[2])
    assert 5 not in idx.tolist() and len(idx) == len(data) - 1  # the unreadable picture is left out in both
    assert sims.std() > 0
    # after push each prototype is a patch of a kept map: its best similarity is that of distance 0
    # (up to the rounding of ||z||^2 - 2 z.p + ||p||^2, which the log near d = 0 magnifies)
    own = sims.max(dim=0).values
    torch.testing.assert_close(own, model.similarity(torch.zeros(model.num_prototypes)), atol=0.05, rtol=0)


def test_kept_latent_maps_past_their_budget_are_dropped():
    data = ColourDataset(num_classes=3, per_class=4)
    model = tiny_model()
    kept = KeptLatents(max_bytes=100)  # less than one batch's maps
    push_prototypes(model, data, batch_size=5, keep_latents=kept)
    assert not kept.complete and kept.batches == [] and kept.nbytes == 0
    with pytest.raises(ValueError, match="incomplete"):
        collect_similarities_from_latents(model, kept)


def test_cached_stage_matches_full_forward_passes():
    data = ColourDataset(num_classes=3, per_class=5)
    a, b = tiny_model(seed=4), tiny_model(seed=4)
    for model in (a, b):
        push_prototypes(model, data, batch_size=8)
        set_trainable(model, "last_layer")
    opt_a = torch.optim.Adam(a.last_layer.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(b.last_layer.parameters(), lr=1e-2)
    sims, labels, _ = collect_similarities(a, data)
    optimise_last_layer(a, sims, labels, opt_a, iterations=4, batch_size=4, l1=1e-3, generator=torch.Generator().manual_seed(9))
    optimise_last_layer_full_forward(b, data, opt_b, iterations=4, batch_size=4, l1=1e-3, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a.last_layer.weight, b.last_layer.weight, atol=1e-5, rtol=1e-4)
    assert not torch.equal(a.last_layer.weight, tiny_model(seed=4).last_layer.weight), "the stage must change the weights"


def objective(model, sims, labels, l1):
    with torch.no_grad():
        logits = model.last_layer(sims)
        return float(F.cross_entropy(logits, labels) + l1 * l1_wrong_class(model.last_layer.weight, model.class_identity))


def test_stage_reaches_the_convex_optimum():
    # Overlapping classes (random similarity vectors) make the optimum finite.
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (120,), generator=g)
    sims = torch.rand(120, 6, generator=g) * 3 + torch.nn.functional.one_hot(labels, 3).repeat_interleave(2, 1)
    l1 = 1e-2
    model = tiny_model(seed=5)
    set_trainable(model, "last_layer")
    start = objective(model, sims, labels, l1)
    opt = torch.optim.Adam(model.last_layer.parameters(), lr=1e-2)
    optimise_last_layer(model, sims, labels, opt, iterations=400, batch_size=40, l1=l1, generator=torch.Generator().manual_seed(0))
    staged = objective(model, sims, labels, l1)

    # A long full-batch run with a decaying step from the same start approximates the optimum.
    reference = tiny_model(seed=5)
    opt = torch.optim.Adam(reference.last_layer.parameters(), lr=3e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1000, 0.1)
    for _ in range(3000):
        loss = F.cross_entropy(reference.last_layer(sims), labels) + l1 * l1_wrong_class(reference.last_layer.weight, reference.class_identity)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    optimum = objective(reference, sims, labels, l1)
    assert staged < start
    assert abs(staged - optimum) <= 0.01 * abs(start - optimum) + 1e-3, (start, staged, optimum)
