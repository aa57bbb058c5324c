"""A trial's GPU memory, by arithmetic on the CPU: what each width, batch size and augmentation chunk needs, and
whether the trials packed on a card fit beside their CUDA contexts under the cap train.py sets.

    python bench/memory.py          # the tables of BENCHMARKS.md's memory section

Per trial: weights, gradients, best weights (kept on the device) and optimizer state (momentum for SGD and
RMSprop's square average: 1 copy; Adam: 2) at 4 bytes a parameter; the data set on the device (uint8); the tensors
a training step saves for its backward pass at that batch size (counted with saved-tensor hooks, fp32), twice
with a captured graph (its private pool keeps its own set, and the eager partial batch makes another); the
evaluation's largest two consecutive activations at its batch size; and the augmentation chunk's float
temporaries (settings.AUGMENT_BYTES_PER_IMAGE, measured with the profiler on the CPU). cuDNN's workspaces and the
allocator's rounding are not counted: the slack under the cap is for them.
"""

from __future__ import annotations

import torch

from tune_alexnet.model import AlexNet
from tune_alexnet.settings import AUGMENT_BYTES_PER_IMAGE, GPU_MEMORY_CAP, RUNTIME_DEFAULTS

GB = 1e9
TRAIN_IMAGES, TEST_IMAGES, IMAGE_BYTES = 50_000, 10_000, 3 * 32 * 32
CONTEXT_BYTES = 0.5e9  # a CUDA context, outside the allocator
CARDS = {
    "A10G (g5.2xlarge), 4 trials": (23_028 * 2**20, 4),
    "H200, 8 trials": (139 * 2**30, 8),
}  # nvidia-smi: 23,028 MiB; about 139 GiB


def saved_bytes(width: float, batch: int) -> int:
    """Bytes of the tensors one training step keeps for its backward pass (dropout and batch norm on)."""
    model = AlexNet(dropout=True, batchnorm=True, width=width).train()
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.zeros(batch, 3, 32, 32)).sum()
    return total[0]


def eval_bytes(width: float, batch: int) -> int:
    """The largest two consecutive activations of an evaluation batch (inference frees the rest)."""
    model = AlexNet(dropout=True, batchnorm=True, width=width).eval()
    sizes = [batch * IMAGE_BYTES * 4]
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * 4)) for m in model.modules() if
             not list(m.children())]  # fmt: skip
    with torch.inference_mode():
        model(torch.zeros(batch, 3, 32, 32))
    for h in hooks:
        h.remove()
    return max(a + b for a, b in zip(sizes, sizes[1:]))


def trial_bytes(width: float, batch: int, chunk: int, optimizer_copies: int = 2, graph: bool = True) -> dict:
    params = sum(p.numel() for p in AlexNet(dropout=True, batchnorm=True, width=width).parameters()) * 4
    parts = {
        "weights, gradients, best weights, optimizer": params * (3 + optimizer_copies),
        "data on the device": (TRAIN_IMAGES + TEST_IMAGES) * IMAGE_BYTES,
        "saved for backward": saved_bytes(width, batch) * (2 if graph else 1),
        "evaluation": eval_bytes(width, RUNTIME_DEFAULTS["eval_batch_size"]),
        "augmentation chunk": max(chunk, batch) * AUGMENT_BYTES_PER_IMAGE,
    }
    parts["total"] = sum(parts.values())
    return parts


def main() -> None:
    print("| width | batch | chunk | weights etc. (Adam) | data | saved for backward (x2: graph) | evaluation | "
          "augmentation | total |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for width in (0.125, 0.5, 1.0):
        for batch in (32, 64, 128):
            for chunk in (0, 8192):
                p = trial_bytes(width, batch, chunk)
                cells = [f"{v / GB:.2f} GB" for v in p.values()]
                print(f"| {width:g} | {batch} | {chunk} | " + " | ".join(cells) + " |")
    worst = trial_bytes(1.0, 128, 8192)["total"]
    print()
    for card, (memory, k) in CARDS.items():
        cap = GPU_MEMORY_CAP / k * memory
        print(f"- {card}: cap {GPU_MEMORY_CAP:g} x {memory / GB:.2f} GB / {k} = {cap / GB:.2f} GB a trial; "
              f"width 1, batch 128, chunk 8192 needs {worst / GB:.2f} GB; {k} caps + {k} contexts = "
              f"{(k * (cap + CONTEXT_BYTES)) / GB:.2f} GB of {memory / GB:.2f} GB")  # fmt: skip


if __name__ == "__main__":
    main()
