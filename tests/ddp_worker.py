"""Run by tests/test_train.py under `torchrun --nproc_per_node 2`: a short D2R run with gloo on the
CPU."""
import json
import sys

import torch
import torch.distributed as dist

from d2r_lib import train

out = sys.argv[1]
cfg = train.TrainConfig(method="d2r", dataset="synthetic", subset="default", train_size=128,
                        epochs=2, batch_size=32, held_out=16, method_params={"steps": 2})
result = train.fit(cfg, out, device="cpu", progress=False)
flat = torch.cat([p.detach().flatten() for m in (result.target, result.guide)
                  for p in m.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    same = all(torch.equal(gathered[0], g) for g in gathered[1:])
    changed = not torch.equal(flat, flat * 0)
    with open(f"{out}/ranks.json", "w") as f:
        json.dump({"world": dist.get_world_size(), "identical": same, "nonzero": changed,
                   "checksum": flat.double().sum().item()}, f)
dist.destroy_process_group()
