"""Depth cost: the time of one training step for unfreeze=0, 1, 2, 4, all on MobileNetV2 and ResNet-50.

A step is what the training loop does per batch: zero_grad, forward, cross-entropy loss, backward and, unless
`--no-optimizer-step`, an AdamW step over the trainable parameters. The models are `finetune.model.module.
ImageClassifier(name, class_names=["a", "b"], weights=None, unfreeze=...)` at random init (the cost does not depend
on the weights) in `.train()` mode, so frozen blocks run in eval mode as in a real run; the network and batch are
channels-last where `model.channels_last=auto` makes them so (CUDA, and the CPU in eager mode). The batch is
synthetic, from a fixed seed. Each setting: `--warmup` untimed steps, then the median of `--steps` timed ones
(more, until they add up to `--min-time` seconds).

Also checked for every depth: no parameter of a frozen block receives a `.grad`, and no frozen block's output
requires grad, i.e. backward never runs through the frozen prefix.

    python bench/depth_cost.py --quick      # ~2 min on a 2-core CPU: batch 8 at 128 px
    python bench/depth_cost.py              # batch 32 at 224 px (meant for a GPU)
    python bench/depth_cost.py --smoke      # one step, batch 2 at 32 px: the suite runs it
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
from common import (  # noqa: E402
    QUIET_CORES,
    ResourceSampler,
    add_idle_arguments,
    add_smoke_argument,
    load,
    machine,
    resolve_device,
    revision,
    today,
    wait_until_idle,
)
from torch import nn

from finetune.model.module import ImageClassifier
from finetune.training.callbacks import use_memory_format

MODELS = ("mobilenet_v2", "resnet50")
DEPTHS = ("0", "1", "2", "4", "all")

warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batch 8 at 128 px, 3 warm-up and 10 timed steps")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32; --quick 8")
    parser.add_argument("--image-size", type=int, default=None, help="default 224; --quick 128")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (at least)")
    parser.add_argument(
        "--min-time",
        type=float,
        default=2.0,
        help="time steps until they add up to this many seconds too (fast settings get more)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--depths", nargs="+", default=list(DEPTHS), help="unfreeze settings; include 'all'")
    parser.add_argument("--no-optimizer-step", action="store_true", help="time forward + backward only")
    add_idle_arguments(parser, "setting")
    add_smoke_argument(parser)
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.image_size, args.steps, args.warmup, args.min_time = 2, 32, 1, 0, 0.0
        args.models, args.depths, args.max_wait, args.retries = ["mobilenet_v2"], ["0", "all"], -1, 0
    batch_size = args.batch_size or (8 if args.quick else 32)
    image_size = args.image_size or (128 if args.quick else 224)
    steps = args.steps
    warmup = args.warmup
    device = resolve_device(args.device)
    if "all" not in args.depths:
        args.depths.append("all")
    step_kind = "forward + backward" if args.no_optimizer_step else "forward + backward + AdamW step"

    print(f"# {' '.join(['python', 'bench/depth_cost.py', *sys.argv[1:]])}")
    print(f"# {today()}; {machine(device)}; finetune {revision()}")
    print(
        f"# one step = zero_grad + {step_kind}; synthetic batch {batch_size}x3x{image_size}x{image_size} "
        f"(seed 0), 2 classes, random init, fp32; median of {steps} steps (more until they take {args.min_time:g} s) "
        f"after {warmup} warm-up steps"
    )
    idle = wait_until_idle(args.max_wait)
    print(f"# load average before measuring: {idle:.2f}\n")

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, 2, (batch_size,), generator=generator).to(device)

    results: dict[tuple[str, str], dict] = {}
    print(
        "| model | unfreeze | trainable params | ms/step | relative to all | frozen params with .grad "
        "| frozen block outputs requiring grad | timed steps | load | other processes (cores) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        for depth in args.depths:
            unfreeze = depth if depth == "all" else int(depth)
            results[name, depth] = measure(
                name,
                unfreeze,
                images,
                labels,
                device,
                steps,
                warmup,
                not args.no_optimizer_step,
                args.max_wait,
                args.retries,
                args.min_time,
            )
        for depth in args.depths:
            result = results[name, depth]
            result["relative"] = result["ms"] / results[name, "all"]["ms"]
            print(
                f"| {name} | {depth} | {result['trainable']:,} | {result['ms']:.1f} | {result['relative']:.2f} | "
                f"{result['frozen_with_grad']} of {result['frozen_params']} | "
                f"{result['frozen_outputs_with_grad']} of {result['frozen_outputs']} | {result['steps']} | "
                f"{result['load_start']:.2f} | {result['other_cores']:.2f} |",
                flush=True,
            )
    print()
    for name in args.models:
        if "0" in args.depths:
            r = results[name, "0"]
            print(
                f"{name} unfreeze=0: {r['frozen_with_grad']} of {r['frozen_params']} frozen parameters received "
                f"a .grad; {r['frozen_outputs_with_grad']} of {r['frozen_outputs']} frozen block outputs required "
                "grad (0 and 0: backward stops at the head)"
            )
    leaks = [key for key, r in results.items() if r["frozen_with_grad"] or r["frozen_outputs_with_grad"]]
    print(f"backward through frozen blocks: {'FOUND in ' + str(leaks) if leaks else 'none, at every depth'}")
    busy = [f"{name} unfreeze={depth}" for (name, depth), r in results.items() if r["busy"]]
    if busy:
        print(f"WARNING: measured while other processes used the CPU (figures not clean): {', '.join(busy)}")
    print(f"(load average now {load():.2f})")
    first = "0" if "0" in args.depths else args.depths[0]
    ratios = [f"{name} = {results[name, first]['relative']:.2f}" for name in args.models]
    ratios[0] = ratios[0].replace(" = ", f" step time unfreeze={first}/all = ", 1)
    print(", ".join(ratios))


def measure(
    name: str,
    unfreeze,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    steps: int,
    warmup: int,
    optimizer_step: bool,
    max_wait: float,
    retries: int,
    min_time: float,
) -> dict:
    torch.manual_seed(0)
    model = ImageClassifier(name, class_names=["a", "b"], weights=None, unfreeze=unfreeze).to(device)
    use_memory_format(model, device)  # as model.channels_last=auto does
    if model.uses_channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    model.train()  # frozen blocks go back to eval mode
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3) if optimizer_step else None
    criterion = nn.CrossEntropyLoss()

    frozen_names = {p for block in model.frozen_blocks for p in block.parameters}
    frozen_modules = [
        model.network.get_submodule(m)
        for block in model.frozen_blocks
        for m in block.modules
        if _is_module(model.network, m)
    ]
    outputs_with_grad = []
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out: outputs_with_grad.append(isinstance(out, torch.Tensor) and out.requires_grad)
        )
        for module in frozen_modules
    ]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = criterion(model(images), labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()

    step()  # the first step, with the hooks: the checks
    for hook in hooks:
        hook.remove()
    named = dict(model.network.named_parameters())
    with_grad = sum(1 for p in frozen_names if named[p].grad is not None)

    for _ in range(warmup - 1):
        step()
    for attempt in range(retries + 1):  # again if other processes used the CPU meanwhile
        wait_until_idle(max_wait, use_load=False)
        times = []
        with ResourceSampler(device, interval_s=0.2) as sampler:
            while len(times) < steps or sum(times) < min_time:
                started = _sync(device)
                step()
                times.append(_sync(device) - started)
        busy = sampler.result()["other_cores"] >= QUIET_CORES and device.type != "cuda"
        if not busy:
            break
        print(
            f"  ({name} unfreeze={unfreeze}: other processes used {sampler.result()['other_cores']:.2f} cores "
            f"meanwhile: {'again' if attempt < retries else 'kept, flagged busy'})",
            flush=True,
        )
    return {
        "ms": 1000 * statistics.median(times),
        "steps": len(times),
        "trainable": sum(p.numel() for p in trainable),
        "frozen_with_grad": with_grad,
        "frozen_params": len(frozen_names),
        "frozen_outputs_with_grad": sum(outputs_with_grad),
        "frozen_outputs": len(outputs_with_grad),
        "busy": busy,
        **sampler.result(),
    }


def _is_module(network: nn.Module, name: str) -> bool:
    try:
        network.get_submodule(name)
    except AttributeError:
        return False  # a bare parameter (ViT's class token)
    return True


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


if __name__ == "__main__":
    main()
