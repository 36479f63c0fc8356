"""Multi-process training: 2 CPU processes under torchrun (gloo) reach the weights of
one process with the same global batch, and an interrupted 2-process run resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medmtl.commands.train import train
from medmtl.config import load_config
from medmtl.engine.checkpoint import load_checkpoint
from medmtl.engine.distributed import ShardedBatchSampler
from tests.test_cli import TINY

# SGD: AdamW's first steps move a parameter whose true gradient is zero (a conv bias
# before BatchNorm, the keys' qkv bias) by lr x sign(rounding noise), which differs
# between any two summation orders; SGD moves it by the noise itself.
CONFIG = {**TINY, "train": {**TINY["train"], "overlays": 0}}


def _torchrun(args: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "medmtl", "train", *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _parameters(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    # BatchNorm running statistics are process 0's alone under DDP: only parameters compare.
    return {k: v for k, v in state["model"].items() if "running_" not in k and "num_batches" not in k}


def test_sharded_batches_partition_each_global_batch():
    whole = list(ShardedBatchSampler(20, 8, seed=3, epoch=2))
    two = [list(ShardedBatchSampler(20, 8, 3, 2, world=2, rank=r)) for r in range(2)]
    accumulated = list(ShardedBatchSampler(20, 8, 3, 2, world=1, rank=0, accumulate=2))
    assert [len(b) for b in whole] == [8, 8, 4]  # one process keeps the partial batch
    for step in range(2):  # two shards drop it; each step's shards make up the global batch
        assert sorted(two[0][step] + two[1][step]) == sorted(whole[step])
        assert accumulated[2 * step] == two[0][step] and accumulated[2 * step + 1] == two[1][step]
    assert len(two[0]) == 2 and len(accumulated) == 4
    assert list(ShardedBatchSampler(20, 8, 3, 3)) != whole  # another epoch, another order
    with pytest.raises(ValueError, match="train.batch_size must be divisible"):
        ShardedBatchSampler(20, 6, 0, 1, world=4)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(tmp / "two")}))
    _torchrun(["--config", str(config)], tmp)
    return tmp


def test_two_processes_reach_the_single_process_weights(two_process_run, tmp_path):
    config = load_config(_write(tmp_path, {**CONFIG, "output_dir": str(tmp_path / "one")}),
                         ["train.accumulate_steps=2"])
    train(config, log=lambda *_: None)
    one, two = _parameters(tmp_path / "one" / "checkpoint_last.pth"), _parameters(
        two_process_run / "two" / "checkpoint_last.pth")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-6, msg=key)
    histories = [load_checkpoint(p)["history"] for p in (tmp_path / "one" / "checkpoint_last.pth",
                                                        two_process_run / "two" / "checkpoint_last.pth")]
    assert [r["train_loss"] for r in histories[1]] == pytest.approx([r["train_loss"] for r in histories[0]],
                                                                      rel=1e-5)
    # validation metrics are gathered over both processes' halves of the split
    assert histories[1][-1]["dice_mean"] == pytest.approx(histories[0][-1]["dice_mean"], abs=0.02)
    assert (two_process_run / "two" / "metrics.csv").read_text().count("\n") == 3


def test_interrupted_two_process_run_resumes(two_process_run):
    tmp = two_process_run
    config = tmp / "config_b.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(tmp / "interrupted")}))
    _torchrun(["--config", str(config), "--stop-after-epoch", "1"], tmp)
    state = load_checkpoint(tmp / "interrupted" / "checkpoint_last.pth")
    assert state["epoch"] == 1 and len(state["rng_per_process"]) == 2
    _torchrun(["--resume", str(tmp / "interrupted")], tmp)
    resumed, whole = (_parameters(tmp / d / "checkpoint_last.pth") for d in ("interrupted", "two"))
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6, msg=key)


def _write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _sync_batchnorm_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as torch_dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    layer, features, weights = _sync_batchnorm_case()
    layer = torch.nn.SyncBatchNorm.convert_sync_batchnorm(layer)
    shard = [f[rank::world].clone().requires_grad_() for f in features]
    y = layer(shard)
    (y * weights[rank::world]).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for g in grads.values():
        torch_dist.all_reduce(g)
    torch.save({"y": y.detach(), "input_grads": [f.grad for f in shard], "grads": grads,
                "running": [n.running_mean.clone() for n in layer.norms]}, f"{out}/{rank}.pt")
    torch_dist.destroy_process_group()


def _sync_batchnorm_case():
    from medmtl.layers import MultiScalePool

    torch.manual_seed(0)
    layer = MultiScalePool([8, 16]).double()
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(4, 8, 6, 6, generator=g, dtype=torch.float64) * 3 + 5,
                torch.randn(4, 16, 3, 3, generator=g, dtype=torch.float64)]
    weights = torch.randn(4, layer.out_features, generator=g, dtype=torch.float64)
    return layer, features, weights


def test_sync_batchnorm_in_fused_layers_uses_every_process_batch(tmp_path):
    """MultiScalePool folds its BatchNorms into the fused op (batch_norm_as_affine): with
    SyncBatchNorm over 2 processes, outputs, gradients and running statistics equal one
    process's on the whole batch."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_batchnorm_worker, args=(2, port, str(tmp_path)), nprocs=2)
    layer, features, weights = _sync_batchnorm_case()
    features = [f.requires_grad_() for f in features]
    y = layer(features)
    (y * weights).sum().backward()
    parts = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    # process r held samples r, r + 2: interleave the shards back
    torch.testing.assert_close(torch.stack([p["y"] for p in parts], 1).reshape(y.shape), y.detach())
    for i, f in enumerate(features):
        torch.testing.assert_close(torch.stack([p["input_grads"][i] for p in parts], 1).reshape(f.shape), f.grad)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(parts[0]["grads"][name], p.grad, msg=name)
    for i, norm in enumerate(layer.norms):
        torch.testing.assert_close(parts[0]["running"][i], norm.running_mean)
