"""The captured training step on a real GPU: the same losses as eager mode, fresh dropout masks every replay,
batch norm's statistics as in eager mode, a failed capture that falls back to eager, and resume states that take
this run's step mode. Needs CUDA."""

import logging

import pytest
import torch

from tune_alexnet import train
from tune_alexnet.model import AlexNet
from tune_alexnet.settings import RUNTIME_DEFAULTS, TRIAL_DEFAULTS
from tune_alexnet.train import CAPTURE_FALLBACK_TORCH, CaptureFailed, TrainStep, make_optimizer, resolve_runtime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS, BATCH = 200, 32


def runtime(step: str):
    train.set_tf32(False)  # fp32: the study's precision
    torch.backends.cudnn.benchmark = False
    return resolve_runtime({**TRIAL_DEFAULTS, "precision": "fp32"}, {**RUNTIME_DEFAULTS, "step": step}, None)


def batches(n: int = STEPS, seed: int = 0):
    g = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(n, BATCH, 3, 32, 32, device="cuda", generator=g)
    y = torch.randint(0, 10, (n, BATCH), device="cuda", generator=g)
    return x, y


def losses(step_mode: str, optimizer: str, dropout: bool = False, lr: float = 0.001) -> tuple[list, AlexNet]:
    torch.manual_seed(0)
    rt = runtime(step_mode)
    model = AlexNet(dropout=dropout, batchnorm=True, width=0.5).cuda().train()
    opt = make_optimizer(optimizer, model.parameters(), lr, capturable=step_mode == "graph")
    step = TrainStep(model, opt, rt, BATCH)
    x, y = batches()
    out = []
    for i in range(STEPS):
        step.begin_epoch()
        step(x[i], y[i])
        out.append(step.loss_sum.item() / BATCH)
    assert step.mode == step_mode and (step.graph is not None) == (step_mode == "graph")
    return out, model


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop"])
def test_200_captured_steps_give_eager_modes_losses(optimizer):
    eager, eager_model = losses("eager", optimizer)
    graph, graph_model = losses("graph", optimizer)
    # Step by step while the trajectories are still close: a replay runs eager mode's kernels.
    assert graph[:20] == pytest.approx(eager[:20], rel=1e-4)
    if optimizer != "rmsprop":  # RMSprop at lr 1e-3 spikes (a loss near 490): chaotic, compared above only
        # fp32 noise only: kernels may differ in summation order, and 200 steps may amplify that a little.
        assert max(abs(a - b) for a, b in zip(eager, graph)) < 0.02 * max(eager)
    assert sum(graph[-20:]) / 20 < sum(graph[:20]) / 20  # it learns
    for name, buf in eager_model.named_buffers():  # batch norm's running statistics updated in place, as eager
        if "running" in name:
            assert torch.allclose(buf, dict(graph_model.named_buffers())[name], rtol=1e-2, atol=1e-3), name


def test_every_replay_draws_fresh_dropout_masks():
    torch.manual_seed(0)
    rt = runtime("graph")
    model = AlexNet(dropout=True, batchnorm=False, width=0.5).cuda().train()
    opt = make_optimizer("sgd", model.parameters(), 0.0)  # no update: only the masks can change the loss
    opt.param_groups[0]["weight_decay"] = 0.0
    step = TrainStep(model, opt, rt, BATCH)
    x, y = batches(1)
    seen = []
    for _ in range(8):
        step.begin_epoch()
        step(x[0], y[0])
        seen.append(step.loss_sum.item())
    assert step.graph is not None
    assert len(set(seen[4:])) == 4, seen  # the replays (after warm-up and capture) all differ


class Syncs(torch.nn.Module):
    """A forward that asks the host for a value: legal in eager mode, impossible inside a CUDA graph. With
    dropout: after a failed capture, an eager dropout needs CUDA's generator out of capture mode."""

    def __init__(self):
        super().__init__()
        self.net = AlexNet(dropout=True, batchnorm=True, width=0.25)

    def forward(self, x):
        if x.abs().sum().item() < 0:
            x = -x
        return self.net(x)


def test_a_step_that_cannot_be_captured_trains_eagerly_with_one_warning(caplog):
    rt = runtime("graph")
    model = Syncs().cuda().train()
    opt = make_optimizer("adam", model.parameters(), 0.001, capturable=True)
    step = TrainStep(model, opt, rt, BATCH)
    x, y = batches(6)
    stream = torch.cuda.current_stream()
    if torch.torch_version.TorchVersion(torch.__version__) < CAPTURE_FALLBACK_TORCH:
        with pytest.raises(CaptureFailed, match="run with --step eager"):
            for i in range(6):
                step(x[i], y[i])
        assert torch.cuda.current_stream() == stream
        return
    with caplog.at_level(logging.WARNING, logger="tune_alexnet.train"):
        for i in range(6):
            step(x[i], y[i])
    assert torch.cuda.current_stream() == stream  # not the capture's side stream
    assert step.mode == "eager" and step.graph is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("capturing the training step as a CUDA graph failed")
    assert torch.isfinite(step.loss_sum)


# --- resume states in this run's step mode ------------------------------------------------------------------

CONFIG = {**TRIAL_DEFAULTS, "optimizer": "adam", "lr": 0.001, "batch_size": BATCH, "dropout": True,
          "batchnorm": True, "width": 0.25, "precision": "fp32"}  # fmt: skip


def written_by(step_mode: str) -> dict:
    """A resume state as a trial in `step_mode` writes it after a few steps, read back as train.py reads it."""
    import io

    rt = runtime(step_mode)
    trial = train._new_trial(CONFIG, rt)
    x, y = batches(6)
    for i in range(6):
        trial.step(x[i], y[i])
    buffer = io.BytesIO()
    torch.save(train._trainer_state(trial, rt), buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def resumed_in(step_mode: str, trainer: dict) -> train.Trial:
    rt = runtime(step_mode)
    trial = train._new_trial(CONFIG, rt)
    best = {k: v.cpu() for k, v in trial.model.state_dict().items()}
    train._load_state(trial, trainer, best, rt)
    return trial


def step_devices(trial: train.Trial) -> set[str]:
    return {s["step"].device.type for s in trial.optimizer.state.values()}


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_an_eager_state_resumed_with_a_captured_step_captures(optimizer):
    CONFIG["optimizer"] = optimizer
    try:
        trial = resumed_in("graph", written_by("eager"))
    finally:
        CONFIG["optimizer"] = "adam"
    assert step_devices(trial) == {"cuda"} and trial.optimizer.param_groups[0]["capturable"] is True
    x, y = batches(6, seed=1)
    for i in range(6):
        trial.step(x[i], y[i])
    assert trial.step.mode == "graph" and trial.step.graph is not None


def test_a_captured_state_resumed_eagerly_on_cuda_keeps_its_step_counts_on_the_host():
    trial = resumed_in("eager", written_by("graph"))
    assert step_devices(trial) == {"cpu"} and trial.optimizer.param_groups[0]["capturable"] is False
    x, y = batches(2, seed=1)
    trial.step(x[0], y[0])  # cuDNN's choices first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trial.step(x[1], y[1])  # a step count on the device would be read with .item(): a sync, an error here
    finally:
        torch.cuda.set_sync_debug_mode("default")
