"""benchmarks/reference_schedule.py --reference: the reference's own code driven as its main.py
drives it. A stand-in checkout (the reference's function names and signatures, recording each
call) checks the order of the calls, the run-time .cuda() patch on a CPU and that nothing of the
checkout stays imported; the real checkout is not part of this repository."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from conftest import load_benchmark

STAND_IN = {
    "calls.py": "CALLS = []\n",
    "preprocess.py": """
        mean = (0.485, 0.456, 0.406)
        std = (0.229, 0.224, 0.225)
        def preprocess_input_function(x):
            return x
    """,
    "model.py": """
        import torch
        from torch import nn
        from calls import CALLS
        class PPNet(nn.Module):
            def __init__(self, classes, shape):
                super().__init__()
                self.features = nn.Conv2d(3, 4, 3)
                self.add_on_layers = nn.Conv2d(4, shape[1], 1)
                self.prototype_vectors = nn.Parameter(torch.rand(shape))
                self.last_layer = nn.Linear(shape[0], classes, bias=False)
            def forward(self, x):
                z = self.add_on_layers(self.features(x)).mean(dim=(2, 3))
                d = torch.cdist(z, self.prototype_vectors.flatten(1))
                return self.last_layer(-d), d
        def construct_PPNet(base_architecture, pretrained=True, img_size=224, prototype_shape=(2000, 512, 1, 1),
                            num_classes=200, prototype_activation_function='log', add_on_layers_type='bottleneck'):
            CALLS.append(("construct", base_architecture, pretrained, img_size, tuple(prototype_shape), num_classes))
            return PPNet(num_classes, prototype_shape)
    """,
    "train_and_test.py": """
        import torch
        from calls import CALLS
        def _pass(model, dataloader, optimizer):
            for image, label in dataloader:
                image, label = image.cuda(), label.cuda()  # as the reference does
                logits, _ = model(image)
                loss = torch.nn.functional.cross_entropy(logits, label)
                if optimizer is not None:
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            return 0.9
        def train(model, dataloader, optimizer, class_specific=False, coefs=None, log=print):
            CALLS.append(("train", len(optimizer.param_groups)))
            model.train()
            return _pass(model, dataloader, optimizer)
        def test(model, dataloader, class_specific=False, log=print):
            CALLS.append(("test",))
            model.eval()
            with torch.no_grad():
                return _pass(model, dataloader, None)
        def warm_only(model, log=print):
            CALLS.append(("warm_only", type(model).__name__, type(model.module).__name__))
        def joint(model, log=print):
            CALLS.append(("joint",))
        def last_only(model, log=print):
            CALLS.append(("last_only",))
    """,
    "push.py": """
        import os
        from calls import CALLS
        def push_prototypes(dataloader, prototype_network_parallel, class_specific=True, preprocess_input_function=None,
                            prototype_layer_stride=1, root_dir_for_saving_prototypes=None, epoch_number=None,
                            prototype_img_filename_prefix=None, prototype_self_act_filename_prefix=None,
                            proto_bound_boxes_filename_prefix=None, save_prototype_class_identity=True, log=print,
                            prototype_activation_function_in_numpy=None):
            CALLS.append(("push", epoch_number, root_dir_for_saving_prototypes is not None))
            for image, label in dataloader:
                assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0  # the push loader is not normalised
    """,
    "save.py": """
        from calls import CALLS
        def save_model_w_condition(model, model_dir, model_name, accu, target_accu, log=print):
            CALLS.append(("save", model_name, accu > target_accu))
    """,
}


@pytest.fixture()
def stand_in(tmp_path):
    checkout = tmp_path / "ProtoPNet"
    checkout.mkdir()
    for name, text in STAND_IN.items():
        (checkout / name).write_text(textwrap.dedent(text))
    sys.path.insert(0, str(checkout))  # the test reads the calls the stand-in records
    import calls

    calls.CALLS.clear()
    yield checkout, calls.CALLS
    sys.path.remove(str(checkout))
    sys.modules.pop("calls", None)


def test_the_reference_code_runs_in_main_py_order_on_a_cpu(stand_in, tmp_path):
    bench = load_benchmark("reference_schedule")
    speed = load_benchmark("bench_speed")
    checkout, calls = stand_in
    root = tmp_path / "images"
    speed.write_jpegs(root, 2, 3, 2, width=40, height=30)
    cuda = torch.Tensor.cuda
    times = bench.real_reference_schedule(checkout, root, "resnet18", 32, torch.device("cpu"), 0, True, True,
                                          tmp_path / "work", epochs=3, warm=1, iterations=2)
    assert torch.Tensor.cuda is cuda  # the patch is undone
    assert not any(getattr(m, "__file__", "") and str(checkout) in str(m.__file__) for name, m in list(sys.modules.items())
                   if name != "calls")
    kinds = [c[0] for c in calls]
    monitor = ["test", "save"]
    assert kinds == (["construct", "warm_only", "train", *monitor, "joint", "train", *monitor, "joint", "train", *monitor,
                      "push", *monitor, "last_only", "train", *monitor, "train", *monitor])
    assert calls[0] == ("construct", "resnet18", False, 32, (20, 128, 1, 1), 2)  # no download, 10 prototypes per class
    assert calls[1][1:] == ("DataParallel", "PPNet")  # the reference's own wrapper
    trains = [c[1] for c in calls if c[0] == "train"]
    assert trains == [2, 3, 3, 1, 1]  # warm-up (add-on, prototypes), joint (+ features), last layer
    assert ("push", 2, True) in calls
    saves = [c[1] for c in calls if c[0] == "save"]
    assert saves == ["0nopush", "1nopush", "2nopush", "2push", "2_0push", "2_1push"]
    assert set(times) == {"warm-up epoch", "joint epoch", "push", "last layer", "monitoring", "whole schedule"}
    assert all(v >= 0 for v in times.values())
    staged = times["warm-up epoch"] + 2 * times["joint epoch"] + times["push"] + times["last layer"] + times["monitoring"]
    assert times["whole schedule"] >= staged * 0.999


def test_a_directory_that_is_not_the_reference_is_refused(tmp_path, capsys):
    bench = load_benchmark("reference_schedule")
    with pytest.raises(SystemExit):
        bench.main(["--reference", str(tmp_path), "--quick"])
    assert "not a checkout of the reference" in capsys.readouterr().err
