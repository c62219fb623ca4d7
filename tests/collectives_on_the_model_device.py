"""Run train.py with every torch.distributed collective checked: each tensor handed to one must be
on the device the model trains on (a NCCL group has no CPU backend, so a CPU tensor there stops
the run). `torchrun ... tests/collectives_on_the_model_device.py DEVICE [train.py flags]`."""
import functools
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

EXPECTED = torch.device(sys.argv.pop(1))
SEEN = []


def checked(collective):
    @functools.wraps(collective)
    def wrapper(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
        for t in tensors:
            if t.device != EXPECTED:
                raise RuntimeError(f"{collective.__name__} got a tensor on {t.device}, the model is on {EXPECTED}")
        SEEN.append(collective.__name__)
        return collective(*args, **kwargs)
    return wrapper


for name in ("all_reduce", "all_gather", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter"):
    setattr(dist, name, checked(getattr(dist, name)))

if __name__ == "__main__":
    train.main(sys.argv[1:])
    print(f"collectives checked: {len(SEEN)} ({', '.join(sorted(set(SEEN)))})", flush=True)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        train.leave_without_teardown()
