"""The reference implementation's training schedule, re-implemented from its algorithmic choices, timed
against protopnet's on the same workload.

    python benchmarks/reference_schedule.py [--backbone resnet18] [--size 224] [--threads 2]
        [--reference DIR] [--no-monitoring] [--no-push-images] [--cpu-time] [--quick]

The reference (github.com/cfchen-duke/ProtoPNet: main.py, model.py, train_and_test.py, push.py,
helpers.py, save.py) is not a package and needs CUDA, so this script re-implements what it does —
written from a reading of it, not copied — on the workload of ``bench_speed.py``: 10 classes,
30 training and 10 test JPEGs per class, 10 prototypes per class of 128 channels, batch 16, and
the schedule ``bench_speed.py`` times as "whole schedule" (1 warm-up epoch, 2 joint epochs, push
after the last, 20 last-layer iterations). Its choices:

* distances: ``||z||^2`` of every patch as a convolution of ``z^2`` with an all-ones kernel of the
  prototypes' shape (M x D x h x w), i.e. the same sum computed once per prototype, plus the cross
  term ``z . p`` as a convolution; min pooling as ``-max_pool2d(-d)``;
* every training batch: forward, the four loss terms with the class-identity columns gathered on
  the host, five ``.item()`` reads, PyTorch's default Adam;
* after every epoch, after push and after every last-layer iteration: a full test pass, and the
  whole model saved with ``torch.save`` when test accuracy > 0.70 ("monitoring");
* push: each batch through the network, latents and distance maps copied to numpy, then a Python
  loop over all M prototypes: the distance maps of the batch's images of the prototype's class,
  ``np.amin``/``np.argmin``, and whenever it beats the best so far: the patch, the prototype's
  activation map on the image (numpy log), upsampled bicubically to the image size, the
  95th-percentile crop (row and column scans), and the prototype's pictures written to disk (the
  image, the image with the activation overlaid, the crop) and its activation map (.npy);
* the last-layer stage: each of the 20 iterations a full pass over the training images in train
  mode (forward through the whole network, backward into the last layer), then a test pass.

(Its DataParallel wrapper and CUDA copies are left out: this runs on the CPU or one GPU.)
protopnet runs the same schedule with ``Trainer.fit`` (``bench_speed.run_config``): the last layer
optimised on similarity vectors computed once, push in one vectorised pass, checkpoints after
every step, and one test evaluation at the end. ``--no-monitoring`` drops the reference's test
passes and saves, leaving only its training work. Prints a markdown table of seconds per stage
and the ratio reference / protopnet.

``--reference DIR`` times the reference's own code as well: DIR is a checkout of
github.com/cfchen-duke/ProtoPNet (nothing of it is copied here; it needs its own dependencies,
``pip install opencv-python-headless matplotlib``). Its ``model.construct_PPNet`` (without
pretrained weights), ``train_and_test`` and ``push.push_prototypes`` run as its ``main.py`` runs
them (``DataParallel``, torchvision ``ImageFolder`` loaders, the test pass and conditional save
after every epoch, push and last-layer iteration, the prototype pictures), on the same pictures.
On a CPU it is patched at run time only: ``Tensor.cuda`` and ``Module.cuda`` return their object
unchanged while it runs. The table then has a column for the real code, one for the
re-implementation and the ratio between them, so the re-implementation's figures can be checked.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

if "--cpu-time" in sys.argv:  # before OpenMP starts: idle threads sleep instead of spinning (spinning is CPU time)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import run_config, write_jpegs  # noqa: E402  (the same workload)

CLOCK: Callable[[], float] = time.perf_counter


class ReferenceNet(nn.Module):
    """The reference's network: backbone, 'regular' add-on (1x1 conv, ReLU, 1x1 conv, sigmoid),
    prototypes, an all-ones tensor of the prototypes' shape, a bias-free last layer."""

    def __init__(self, backbone: str, num_classes: int, per_class: int = 10, dim: int = 128) -> None:
        super().__init__()
        from protopnet.model.backbones import build_backbone

        built = build_backbone(backbone, pretrained=False)
        self.features = built.module
        self.add_on = nn.Sequential(nn.Conv2d(built.out_channels, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1), nn.Sigmoid())
        m = num_classes * per_class
        self.shape = (m, dim, 1, 1)
        self.num_classes = num_classes
        self.prototypes = nn.Parameter(torch.rand(self.shape))
        self.ones = nn.Parameter(torch.ones(self.shape), requires_grad=False)
        self.identity = torch.zeros(m, num_classes)  # (M, K) on the host, as the reference keeps it
        self.identity[torch.arange(m), torch.arange(m) // per_class] = 1
        self.last_layer = nn.Linear(m, num_classes, bias=False)
        with torch.no_grad():
            self.last_layer.weight.copy_(self.identity.t() - 0.5 * (1 - self.identity.t()))
        self.mean, self.std = built.mean, built.std

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_on(self.features(x))

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        z_sq = F.conv2d(z * z, self.ones)  # ||z||^2 once per prototype
        p_sq = (self.prototypes**2).sum(dim=(1, 2, 3)).view(-1, 1, 1)
        return F.relu(z_sq - 2 * F.conv2d(z, self.prototypes) + p_sq)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.distances(self.latent(x))
        min_d = -F.max_pool2d(-d, kernel_size=(d.shape[2], d.shape[3])).view(-1, self.shape[0])
        return self.last_layer(torch.log((min_d + 1) / (min_d + 1e-4))), min_d


def _loader(dataset: Any, batch_size: int, shuffle: bool, workers: int) -> Any:
    from protopnet.train.loader import IndexedSubset, make_loader

    return make_loader(IndexedSubset(dataset), batch_size, shuffle=shuffle, num_workers=workers)


def run_epoch(net: ReferenceNet, loader: Any, device: torch.device, optimizer: torch.optim.Optimizer | None) -> float:
    """One pass as the reference's train/test loop makes it; returns the accuracy."""
    training = optimizer is not None
    net.train(training)
    correct = seen = 0
    max_dist = float(np.prod(net.shape[1:]))
    for batch in loader:
        x, y = batch.images.to(device), batch.labels.to(device)
        with torch.enable_grad() if training else torch.no_grad():
            logits, min_d = net(x)
            ce = F.cross_entropy(logits, y)
            correct_class = net.identity[:, batch.labels].t().to(device)  # gathered on the host
            cluster = torch.mean(max_dist - torch.max((max_dist - min_d) * correct_class, dim=1)[0])
            wrong = 1 - correct_class
            separation = torch.mean(max_dist - torch.max((max_dist - min_d) * wrong, dim=1)[0])
            avg_separation = torch.mean(torch.sum(min_d * wrong, dim=1) / torch.sum(wrong, dim=1))
            l1 = (net.last_layer.weight * (1 - net.identity.t().to(device))).norm(p=1)
            correct += (logits.detach().argmax(1) == y).sum().item()
            seen += y.shape[0]
            for term in (ce, cluster, separation, avg_separation):  # the per-batch host reads
                term.item()
        if training:
            loss = ce + 0.8 * cluster - 0.08 * separation + 1e-4 * l1
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    p = net.prototypes.detach().view(net.shape[0], -1).cpu()  # the end-of-pass prototype spread
    ((p.unsqueeze(2) - p.t().unsqueeze(0)) ** 2).sum(dim=1).mean().item()
    return correct / max(seen, 1)


def _high_activation_crop(activation: np.ndarray, percentile: float = 95) -> tuple[int, int, int, int]:
    mask = activation >= np.percentile(activation, percentile)
    rows = [i for i in range(mask.shape[0]) if mask[i].max()]
    cols = [j for j in range(mask.shape[1]) if mask[:, j].max()]
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _save_picture(array: np.ndarray, path: Path) -> None:
    Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


def push(net: ReferenceNet, dataset: Any, device: torch.device, workers: int, image_dir: Path | None) -> None:
    """The reference's push: a per-prototype numpy loop over each batch's distance maps."""
    net.eval()
    m = net.shape[0]
    best = np.full(m, np.inf)
    patches = np.zeros(net.shape)
    mean, std = np.array(net.mean).reshape(1, 1, 3), np.array(net.std).reshape(1, 1, 3)
    for batch in _loader(dataset, 16, False, workers):
        with torch.no_grad():
            z = net.latent(batch.images.to(device))
            d = net.distances(z)
        z_np, d_np = np.copy(z.cpu().numpy()), np.copy(d.cpu().numpy())
        by_class: dict[int, list[int]] = {k: [] for k in range(net.num_classes)}
        for i, label in enumerate(batch.labels.tolist()):
            by_class[label].append(i)
        for j in range(m):
            k = int(torch.argmax(net.identity[j]))
            if not by_class[k]:
                continue
            maps = d_np[by_class[k]][:, j]
            if np.amin(maps) >= best[j]:
                continue
            where = list(np.unravel_index(np.argmin(maps, axis=None), maps.shape))
            image = by_class[k][where[0]]
            best[j] = maps[tuple(where)]
            patches[j] = z_np[image, :, where[1] : where[1] + 1, where[2] : where[2] + 1]
            activation = np.log((d_np[image, j] + 1) / (d_np[image, j] + 1e-4)).astype(np.float32)
            size = batch.images.shape[-1]
            upsampled = np.asarray(Image.fromarray(activation).resize((size, size), Image.Resampling.BICUBIC))
            y0, y1, x0, x1 = _high_activation_crop(upsampled)
            picture = batch.images[image].permute(1, 2, 0).numpy() * std + mean  # back to [0, 1]
            if image_dir is not None:
                heat = (upsampled - upsampled.min()) / max(float(upsampled.max() - upsampled.min()), 1e-12)
                np.save(image_dir / f"self-act{j}.npy", activation)
                _save_picture(picture, image_dir / f"prototype-img-original{j}.png")
                _save_picture(0.5 * picture + 0.3 * heat[..., None], image_dir / f"prototype-img-original_with_self_act{j}.png")
                _save_picture(picture[y0:y1, x0:x1], image_dir / f"prototype-img{j}.png")
    with torch.no_grad():
        net.prototypes.copy_(torch.tensor(patches, dtype=torch.float32))


def set_trainable(net: ReferenceNet, stage: str) -> None:
    for p in net.features.parameters():
        p.requires_grad = stage == "joint"
    for p in net.add_on.parameters():
        p.requires_grad = stage in ("warm", "joint")
    net.prototypes.requires_grad = stage in ("warm", "joint")
    for p in net.last_layer.parameters():
        p.requires_grad = True  # the reference leaves the last layer trainable in every stage (its optimisers decide)


def reference_schedule(root: Path, backbone: str, size: int, device: torch.device, workers: int, monitoring: bool,
                       push_images: bool, work: Path, epochs: int = 3, warm: int = 1, iterations: int = 20) -> dict[str, float]:
    """Seconds per stage of the reference's loop (main.py) on the workload; 'whole schedule' is the sum."""
    from protopnet.data import ImageFolderDataset
    from protopnet.data.base import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    train = ImageFolderDataset(root / "train", image_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    test = ImageFolderDataset(root / "test", image_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, classes=train.classes)
    net = ReferenceNet(backbone, len(train.classes)).to(device)
    joint = torch.optim.Adam([{"params": net.features.parameters(), "lr": 1e-4, "weight_decay": 1e-3},
                              {"params": net.add_on.parameters(), "lr": 3e-3, "weight_decay": 1e-3},
                              {"params": [net.prototypes], "lr": 3e-3}])
    warm_opt = torch.optim.Adam([{"params": net.add_on.parameters(), "lr": 3e-3, "weight_decay": 1e-3},
                                 {"params": [net.prototypes], "lr": 3e-3}])
    last = torch.optim.Adam([{"params": net.last_layer.parameters(), "lr": 1e-4}])
    train_loader, test_loader = _loader(train, 16, True, workers), _loader(test, 16, False, workers)
    times: dict[str, float] = {"warm-up epoch": 0.0, "joint epoch": 0.0, "push": 0.0, "last layer": 0.0, "monitoring": 0.0}
    work.mkdir(parents=True, exist_ok=True)
    image_dir = work / "img" if push_images else None
    if image_dir is not None:
        image_dir.mkdir(parents=True, exist_ok=True)

    def monitor(tag: str) -> None:
        if not monitoring:
            return
        t0 = CLOCK()
        accuracy = run_epoch(net, test_loader, device, None)
        if accuracy > 0.70:
            torch.save(net, work / f"{tag}{accuracy:.4f}.pth")
        times["monitoring"] += CLOCK() - t0

    start = CLOCK()
    for epoch in range(epochs):
        stage = "warm" if epoch < warm else "joint"
        set_trainable(net, stage)
        t0 = CLOCK()
        run_epoch(net, train_loader, device, warm_opt if stage == "warm" else joint)
        times["warm-up epoch" if stage == "warm" else "joint epoch"] += CLOCK() - t0
        monitor(f"{epoch}nopush")
        if epoch == epochs - 1:
            t0 = CLOCK()
            push(net, train, device, workers, image_dir)
            times["push"] += CLOCK() - t0
            monitor(f"{epoch}push")
            set_trainable(net, "last_layer")
            for i in range(iterations):
                t0 = CLOCK()
                run_epoch(net, train_loader, device, last)
                times["last layer"] += CLOCK() - t0
                monitor(f"{epoch}_{i}push")
    times["whole schedule"] = CLOCK() - start
    times["joint epoch"] /= max(epochs - warm, 1)
    return times


def real_reference_schedule(reference: Path, root: Path, backbone: str, size: int, device: torch.device, workers: int,
                            monitoring: bool, push_images: bool, work: Path, epochs: int = 3, warm: int = 1,
                            iterations: int = 20) -> dict[str, float]:
    """Seconds per stage of the reference's own code in ``reference`` (a checkout), driven as its
    main.py drives it, on the workload; 'whole schedule' is the sum of everything timed."""
    import contextlib
    import importlib
    import warnings

    # main.py steps its scheduler before the optimiser; PyTorch warns about it on every run
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")

    from torchvision import datasets, transforms

    @contextlib.contextmanager
    def on_this_device() -> Any:
        """The reference calls .cuda() on tensors and modules: on a CPU, make it the identity."""
        if device.type == "cuda":
            yield
            return
        saved = torch.Tensor.cuda, nn.Module.cuda
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
        nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
        try:
            yield
        finally:
            torch.Tensor.cuda, nn.Module.cuda = saved  # type: ignore[method-assign]

    names = ("model", "train_and_test", "push", "save", "preprocess")
    before = set(sys.modules)
    shadowed = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path.insert(0, str(reference))
    try:
        modules = {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(reference))
        for name in set(sys.modules) - before:  # the reference's modules (and their imports) are not kept
            if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(reference)):
                del sys.modules[name]
        sys.modules.update(shadowed)
    model, tnt, push_module, save, preprocess = (modules[n] for n in names)
    quiet = lambda *args, **kwargs: None  # noqa: E731  (the reference's log: formatted, then dropped)
    torch.manual_seed(0)
    normalize = transforms.Normalize(mean=preprocess.mean, std=preprocess.std)
    resize = transforms.Resize(size=(size, size))
    train = datasets.ImageFolder(str(root / "train"), transforms.Compose([resize, transforms.ToTensor(), normalize]))
    train_push = datasets.ImageFolder(str(root / "train"), transforms.Compose([resize, transforms.ToTensor()]))
    test = datasets.ImageFolder(str(root / "test"), transforms.Compose([resize, transforms.ToTensor(), normalize]))
    train_loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, num_workers=workers, pin_memory=False)
    push_loader = torch.utils.data.DataLoader(train_push, batch_size=16, shuffle=False, num_workers=workers, pin_memory=False)
    test_loader = torch.utils.data.DataLoader(test, batch_size=16, shuffle=False, num_workers=workers, pin_memory=False)
    classes = len(train.classes)
    times: dict[str, float] = {"warm-up epoch": 0.0, "joint epoch": 0.0, "push": 0.0, "last layer": 0.0, "monitoring": 0.0}
    work.mkdir(parents=True, exist_ok=True)
    image_dir = work / "img"
    image_dir.mkdir(exist_ok=True)
    with on_this_device():
        ppnet = model.construct_PPNet(base_architecture=backbone, pretrained=False, img_size=size, prototype_shape=(classes * 10, 128, 1, 1),
                                      num_classes=classes, prototype_activation_function="log", add_on_layers_type="regular").to(device)
        multi = torch.nn.DataParallel(ppnet)  # without a GPU it calls the module directly
        joint = torch.optim.Adam([{"params": ppnet.features.parameters(), "lr": 1e-4, "weight_decay": 1e-3},
                                  {"params": ppnet.add_on_layers.parameters(), "lr": 3e-3, "weight_decay": 1e-3},
                                  {"params": ppnet.prototype_vectors, "lr": 3e-3}])
        scheduler = torch.optim.lr_scheduler.StepLR(joint, step_size=5, gamma=0.1)
        warm_opt = torch.optim.Adam([{"params": ppnet.add_on_layers.parameters(), "lr": 3e-3, "weight_decay": 1e-3},
                                     {"params": ppnet.prototype_vectors, "lr": 3e-3}])
        last = torch.optim.Adam([{"params": ppnet.last_layer.parameters(), "lr": 1e-4}])
        coefs = {"crs_ent": 1, "clst": 0.8, "sep": -0.08, "l1": 1e-4}

        def monitor(tag: str) -> None:
            if not monitoring:
                return
            t0 = CLOCK()
            accuracy = tnt.test(model=multi, dataloader=test_loader, class_specific=True, log=quiet)
            save.save_model_w_condition(model=ppnet, model_dir=str(work), model_name=tag, accu=accuracy, target_accu=0.70, log=quiet)
            times["monitoring"] += CLOCK() - t0

        start = CLOCK()
        for epoch in range(epochs):
            t0 = CLOCK()
            if epoch < warm:
                tnt.warm_only(model=multi, log=quiet)
                tnt.train(model=multi, dataloader=train_loader, optimizer=warm_opt, class_specific=True, coefs=coefs, log=quiet)
                times["warm-up epoch"] += CLOCK() - t0
            else:
                tnt.joint(model=multi, log=quiet)
                scheduler.step()
                tnt.train(model=multi, dataloader=train_loader, optimizer=joint, class_specific=True, coefs=coefs, log=quiet)
                times["joint epoch"] += CLOCK() - t0
            monitor(f"{epoch}nopush")
            if epoch == epochs - 1:
                t0 = CLOCK()
                push_module.push_prototypes(
                    push_loader, prototype_network_parallel=multi, class_specific=True,
                    preprocess_input_function=preprocess.preprocess_input_function, prototype_layer_stride=1,
                    root_dir_for_saving_prototypes=str(image_dir) if push_images else None, epoch_number=epoch,
                    prototype_img_filename_prefix="prototype-img", prototype_self_act_filename_prefix="prototype-self-act",
                    proto_bound_boxes_filename_prefix="bb", save_prototype_class_identity=True, log=quiet,
                )
                times["push"] += CLOCK() - t0
                monitor(f"{epoch}push")
                tnt.last_only(model=multi, log=quiet)
                for i in range(iterations):
                    t0 = CLOCK()
                    tnt.train(model=multi, dataloader=train_loader, optimizer=last, class_specific=True, coefs=coefs, log=quiet)
                    times["last layer"] += CLOCK() - t0
                    monitor(f"{epoch}_{i}push")
        times["whole schedule"] = CLOCK() - start
    times["joint epoch"] /= max(epochs - warm, 1)
    return times


def protopnet_schedule(root: Path, backbone: str, size: int, device: str, work: Path, iterations: int = 20) -> dict[str, float]:
    from protopnet.train import Trainer

    spec = {"backbone": backbone, "size": size, "root": str(root), "cache": False, "device": device, "precision": "fp32",
            "channels_last": False, "last_layer_iterations": iterations}
    out = work / "protopnet"
    trainer = Trainer(run_config(spec, out, epochs=3, warm=1, push_at_end=True), out)
    by_stage: dict[str, list[float]] = {}
    for name in ("_train_epoch", "_push", "_last_layer"):  # timed with the same clock as the reference
        def timed(step: Any, original: Callable[[Any], Any] = getattr(trainer, name)) -> Any:
            t0 = CLOCK()
            record = original(step)
            by_stage.setdefault(step.stage, []).append(CLOCK() - t0)
            return record

        setattr(trainer, name, timed)
    t0 = CLOCK()
    trainer.fit()
    total = CLOCK() - t0
    return {"warm-up epoch": statistics.mean(by_stage.get("warm", [0.0])), "joint epoch": statistics.mean(by_stage.get("joint", [0.0])),
            "push": sum(by_stage.get("push", [0.0])), "last layer": sum(by_stage.get("last_layer", [0.0])),
            "whole schedule": total}


def main(argv: list[str] | None = None) -> None:
    global CLOCK
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for both (the reference used 4)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-monitoring", action="store_true", help="leave out the reference's test passes and saves")
    parser.add_argument("--no-push-images", action="store_true", help="leave out the reference's prototype pictures")
    parser.add_argument("--cpu-time", action="store_true", help="CPU time instead of wall time (a busy shared machine)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two schedules this many times; each stage's minimum is kept")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 classes x (4 + 2) images, 64 px, 2 last-layer iterations")
    parser.add_argument("--reference", type=Path, help="a checkout of github.com/cfchen-duke/ProtoPNet: also time its own code")
    args = parser.parse_args(argv)
    if args.reference is not None and not (args.reference / "train_and_test.py").is_file():
        parser.error(f"--reference {args.reference}: not a checkout of the reference (no train_and_test.py there)")
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK = time.process_time
    from protopnet.runtime import resolve_device

    device = resolve_device(args.device)
    classes, train, test, iterations = (3, 4, 2, 2) if args.quick else (10, 30, 10, 20)
    size = 64 if args.quick and args.size == parser.get_default("size") else args.size
    with tempfile.TemporaryDirectory(prefix="reference_schedule_") as tmp:
        root, work = Path(tmp) / "images", Path(tmp) / "work"
        write_jpegs(root, classes, train, test)
        work.mkdir()
        # warm-up: files in the page cache, kernels chosen (untimed)
        reference_schedule(root, args.backbone, size, device, args.workers, True, False, work / "warm", epochs=2, warm=1, iterations=1)
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "reference": []}
        if args.reference is not None:
            real_reference_schedule(args.reference, root, args.backbone, size, device, args.workers, True, False, work / "warm-real",
                                    epochs=2, warm=1, iterations=1)
            runs["real"] = []
        for r in range(args.repeats):  # alternated: a change of load on a shared machine hits both
            runs["ours"].append(protopnet_schedule(root, args.backbone, size, str(device), work / f"ours{r}", iterations))
            runs["reference"].append(reference_schedule(root, args.backbone, size, device, args.workers, not args.no_monitoring,
                                                        not args.no_push_images, (work / f"reference{r}"), iterations=iterations))
            if args.reference is not None:
                runs["real"].append(real_reference_schedule(args.reference, root, args.backbone, size, device, args.workers,
                                                            not args.no_monitoring, not args.no_push_images, work / f"real{r}",
                                                            iterations=iterations))
        best = {who: {k: min(run[k] for run in runs[who]) for k in runs[who][0]} for who in runs}
        ours, reference = best["ours"], best["reference"]
    print(f"# Reference schedule vs protopnet — {args.backbone}, {size} px, {classes} classes x ({train} train + {test} test) JPEGs, "
          f"batch 16, {args.threads} threads, {device}{', CPU time' if args.cpu_time else ''}, best of {args.repeats}"
          f"{', reference without monitoring' if args.no_monitoring else ''}\n")
    real = best.get("real")
    if real is None:
        print("| stage | reference (s) | protopnet (s) | reference / protopnet |")
        print("|---|---|---|---|")
    else:
        print("| stage | reference's code (s) | re-implementation (s) | re-implementation / code | protopnet (s) | code / protopnet |")
        print("|---|---|---|---|---|---|")
    for stage in ("warm-up epoch", "joint epoch", "push", "last layer", "monitoring", "whole schedule"):
        r, o = reference.get(stage), ours.get(stage)
        shown = "" if o is None else f"{o:.2f}"
        if real is None:
            print(f"| {stage} | {r:.2f} | {shown} | {f'{r / o:.2f}' if r is not None and o else ''} |")
        else:
            c = real[stage]
            print(f"| {stage} | {c:.2f} | {r:.2f} | {r / c:.2f} | {shown} | {f'{c / o:.2f}' if o else ''} |")
    print(f"\nwhole schedule: 1 warm-up + 2 joint epochs, push, {iterations} last-layer iterations; protopnet's includes "
          f"its checkpoints and final test evaluation, the reference's its test passes and conditional saves (monitoring).")


if __name__ == "__main__":
    main()
