"""The lifecycle hooks of methods/base.py as the core runs them: the order within an epoch,
what the batch carries, before_step at step 0 before the optimiser, the optimiser groups a
part sets, predict in evaluation, the loaders' mappings, and the revision comparison's
bit-for-bit check."""
import types

import torch
from trainer_helpers import TinySegNet, batch

import methods
from argparser import build_options
from dataset.loader import JoinedDataset, MappingDataset, as_mapping
from engine import build
from engine.evaluate import evaluate
from methods import registry
from metrics import StreamSegMetrics
from tools.compare_revisions import differences
from train import Trainer

CPU = torch.device("cpu")


class Recorder(methods.Part):
    """Notes every hook call (and what the batch carries)."""
    name = "recorder"

    def __init__(self, info, calls):
        super().__init__(info)
        self.calls = calls

    def network(self, net, role):
        self.calls.append(("network", role))
        return net

    def before_step(self, step):
        self.calls.append(("before_step", [p.requires_grad for p in step.model.parameters()]))
        for p in step.model.body.parameters():
            p.requires_grad = False

    def optimizer_groups(self, groups, model):
        self.calls.append(("optimizer_groups", len(groups)))
        return [{"params": list(model.cls.parameters()), "weight_decay": 0.0,
                 "lr_factor": 10.0}]

    def train_mode(self, model):
        self.calls.append(("train_mode", model.training))

    def prepare_batch(self, batch):
        self.calls.append(("prepare_batch", batch.epoch, batch.iteration, batch.training,
                           sorted(batch.extras)))
        batch.extras["note"] = batch.iteration

    def rewrite_targets(self, batch):
        self.calls.append(("rewrite_targets", batch.extras["note"]))

    def after_optimizer_step(self, batch):
        self.calls.append(("after_optimizer_step", batch.iteration))

    def after_epoch(self, epoch):
        self.calls.append(("after_epoch", epoch))

    def predict(self, outputs):
        return outputs[:, 1:].argmax(dim=1) + 1       # never background


def recording_method(calls, opts, classes):
    info = methods.StepInfo(opts, classes, CPU)
    return registry.StepMethod([p for f in registry.families() for p in f.parts(info)]
                               + [Recorder(info, calls)])


def test_an_epoch_runs_the_hooks_in_order_with_what_the_batch_carries():
    calls = []
    opts = build_options(["--task", "15-5", "--no_progress"])
    method = recording_method(calls, opts, [16])
    model = TinySegNet([16], seed=1)
    trainer = Trainer(model, None, CPU, opts, classes=[16], method=method)
    images, labels = batch(0, 16)
    saliency = torch.zeros_like(labels, dtype=torch.uint8)
    loader = [(images, labels), {"image": images, "label": labels,
                                 "extras": {"saliency": saliency}}]
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer.train(3, optim, loader)
    assert calls == [("train_mode", True),
                     ("prepare_batch", 3, 0, True, []), ("rewrite_targets", 0),
                     ("after_optimizer_step", 0),
                     ("prepare_batch", 3, 1, True, ["saliency"]), ("rewrite_targets", 1),
                     ("after_optimizer_step", 1),
                     ("after_epoch", 3)]
    assert trainer.predict(torch.tensor([[[[5.0]], [[1.0]], [[2.0]]]])).item() == 2


def test_before_step_runs_at_step0_before_the_optimiser_with_the_parts_groups():
    calls = []
    opts = build_options(["--task", "15-5", "--backbone", "resnet18", "--no_pretrained",
                          "--no_progress", "--lr", "0.02"])
    opts.norm_impl = "torch"
    method = recording_method(calls, opts, [16])
    ctx = types.SimpleNamespace(device=CPU, rank=0, world_size=1)
    data = types.SimpleNamespace(train_loader=[None, None])
    models = build.build_models(opts, ctx, [16], data, method, logger=None)
    assert calls[0] == ("network", "train")
    assert calls[1][0] == "before_step" and all(calls[1][1])   # nothing frozen before it
    assert calls[2] == ("optimizer_groups", 3)
    [group] = models.optimizer.param_groups
    assert group["lr"] == 0.02 * 10.0 and group["lr_factor"] == 10.0
    assert not any(p.requires_grad for p in models.model.body.parameters())
    assert [id(p) for p in group["params"]] == [id(p) for p in models.model.cls.parameters()]
    assert models.scheduler.base_lrs == [0.02 * 10.0]


def test_a_network_without_the_usual_layout_gets_one_group_of_its_trainable_parameters():
    opts = build_options(["--task", "15-5", "--weight_decay", "0.5"])
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1))
    net[0].weight.requires_grad = False
    [group] = build.default_groups(net, opts)
    assert [id(p) for p in group["params"]] == [id(net[0].bias), id(net[1].weight),
                                                id(net[1].bias)]
    assert group["weight_decay"] == 0.5


def test_evaluate_counts_the_label_map_of_predict():
    class Constant(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 3, *x.shape[-2:])
            out[:, 0] = 1.0               # argmax would say background everywhere
            return out, {}
    labels = torch.full((1, 2, 2), 2, dtype=torch.long)
    loader = [{"image": torch.zeros(1, 3, 2, 2), "label": labels, "extras": {}}]
    plain = evaluate(Constant(), loader, StreamSegMetrics(3), CPU, progress=False)
    ruled = evaluate(Constant(), loader, StreamSegMetrics(3), CPU, progress=False,
                     predict=lambda z: torch.full(z.shape[:1] + z.shape[2:], 2))
    assert plain.score["Overall Acc"] == 0.0 and ruled.score["Overall Acc"] == 1.0


def test_loader_items_are_mappings_and_joined_sets_pass_the_sample_seed():
    class Keys(torch.utils.data.Dataset):
        def __init__(self, tag, n):
            self.tag, self.n = tag, n

        def __getitem__(self, item):
            return torch.tensor(self.tag), torch.tensor(item[1] if isinstance(item, tuple)
                                                        else -1)

        def __len__(self):
            return self.n
    joined = JoinedDataset([Keys(0, 2), Keys(1, 3)])
    assert len(joined) == 5
    item = joined[(3, 77)]
    assert int(item["image"]) == 1 and int(item["label"]) == 77 and item["extras"] == {}
    assert as_mapping(MappingDataset(Keys(4, 1))[0])["label"].item() == -1


def test_the_revision_comparison_sees_one_changed_bit():
    a = {"w": torch.tensor([1.0, 2.0]), "s": {"n": 3, "x": float("nan")}, "l": [1, 2]}
    b = {"w": torch.tensor([1.0, 2.0]), "s": {"n": 3, "x": float("nan")}, "l": [1, 2]}
    assert differences(a, b) == []
    b["w"] = torch.tensor([1.0, float.fromhex("0x1.0000000000001p+1")]).float()
    b["w"][1] = torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))
    assert differences(a, b) == [".w"]
    assert differences(a, dict(b, w=a["w"].double())) == [".w"]
    assert differences({"l": [1, 2]}, {"l": [1, 3]}) == [".l[1]"]
