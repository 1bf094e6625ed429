"""No checkpoint holds non-finite weights: the training guard checks the loss, the gradients before the
optimizer step and the weights after it, names the step and the tensors, and the last checkpoint whose
weights it read back finite; the checkpoint IO refuses NaN/inf weights and keeps the previous file.

The runs are the tiny classification run of tests/test_train.py (6 steps of 8 images, last.ckpt after every
step). The huge learning rate comes from the real schedule: `schedule=step` multiplies the lr by 5e40 at
step 3 (half an epoch), to 1e38. AdamW's update itself stays below fp32's maximum (it is bounded by about
lr / (1 - beta1^t)), but its decoupled weight decay multiplies the weights by 1 - lr * weight_decay, which
overflows: step 3 has a finite loss and finite gradients and writes inf/NaN into every decayed weight.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist

import train as train_entry
from piip.errors import CheckpointError
from piip.tasks import NonFiniteLossError
from tests.test_atomic_writes import checkpoint_io, forkserver  # noqa: F401 - a fixture
from tests.test_train import checkpoint_dir, train_config

EVERY_STEP = ["callbacks.last_checkpoint.every_n_train_steps=1", "test_after_fit=false"]
HUGE_LR_FROM_STEP_3 = [
    "task.optim.schedule=step",
    "task.optim.warmup_epochs=0",
    "+task.optim.step_milestones=[0.5]",
    "+task.optim.step_gamma=5e40",
    "task.optim.weight_decay=10",  # lr * weight_decay = 1e39 > 3.4e38
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def assert_every_checkpoint_finite(folder: Path) -> None:
    saved = sorted(folder.glob("*.ckpt"))
    assert saved, f"no checkpoint in {folder}"
    for path in saved:
        assert non_finite(weights(path)) == [], f"{path.name} holds non-finite weights"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


class PoisonGradientAtStep(L.Callback):
    """Writes NaN into one gradient after backward of global step `step` (callbacks run before the task's
    own `on_before_optimizer_step`) and its name into `<run>/poisoned.txt`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step == self.step:
            name, param = next((n, p) for n, p in pl_module.named_parameters() if p.grad is not None)
            param.grad.view(-1)[0] = float("nan")
            Path(trainer.default_root_dir, "poisoned.txt").write_text(name)


def test_a_huge_learning_rate_stops_at_the_step_that_wrote_non_finite_weights(tmp_path, data_dir):
    """The issue: step 3's loss was finite, its optimizer step wrote NaN weights, last.ckpt saved them and
    the loss check stopped one step later naming that file as the last good one."""
    with pytest.raises(NonFiniteLossError) as stopped:
        train_entry.train(train_config(tmp_path, data_dir, *EVERY_STEP, *HUGE_LR_FROM_STEP_3))
    message = str(stopped.value)
    assert "the optimizer step wrote non-finite weights into" in message
    assert "at global step 3, epoch 0, batch 3; stopped before any checkpoint of these weights" in message
    last = checkpoint_dir(tmp_path) / "last.ckpt"
    assert f"The last good checkpoint (weights read back, all finite): {last}" in message
    error = stopped.value
    assert (error.kind, error.step, error.epoch, error.batch) == ("weights", 3, 0, 3)
    assert error.last_good == last and len(error.tensors) > 10
    assert all(name in message for name in error.tensors[:5])
    assert torch.load(last, weights_only=True)["global_step"] == 3  # saved after step 2, the last good one
    assert_every_checkpoint_finite(checkpoint_dir(tmp_path))


def test_non_finite_gradients_stop_before_the_optimizer_step(tmp_path, data_dir):
    poison = [
        "+callbacks.poison._target_=tests.test_nonfinite_guard.PoisonGradientAtStep",
        "+callbacks.poison.step=2",
    ]
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradients in 1 of \d+ tensors") as stopped:
        train_entry.train(train_config(tmp_path, data_dir, *EVERY_STEP, *poison))
    error = stopped.value
    assert (error.kind, error.step, error.batch) == ("gradients", 2, 2)
    assert error.tensors == [(tmp_path / "run" / "poisoned.txt").read_text()]
    assert "stopped before the optimizer step (the weights are unchanged)" in str(error)
    last = checkpoint_dir(tmp_path) / "last.ckpt"
    assert error.last_good == last and torch.load(last, weights_only=True)["global_step"] == 2
    assert_every_checkpoint_finite(checkpoint_dir(tmp_path))


def test_the_checkpoint_io_refuses_non_finite_weights_and_keeps_the_previous_file(tmp_path):
    io = checkpoint_io(tmp_path)  # what build_trainer gives the Trainer
    path = tmp_path / "checkpoints" / "last.ckpt"
    good = {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.bfloat16), "steps": torch.tensor(4)}
    io.save_checkpoint({"state_dict": good}, path)
    before = path.read_bytes()
    bad = {
        **good,
        "a": torch.tensor([1.0, float("nan"), 2.0]),
        "b": torch.full((2,), float("inf")).bfloat16(),
    }
    with pytest.raises(CheckpointError, match=r"last\.ckpt.* 2 of 3 tensors \(a, b\).*previous last\.ckpt"):
        io.save_checkpoint({"state_dict": bad}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_the_last_good_checkpoint_is_the_newest_whose_weights_read_back_finite(tmp_path):
    from piip.tasks.finite import checkpoint_candidates, last_finite_checkpoint, read_file_weights

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, value, age in [
        ("best.ckpt", 1.0, 30),
        ("last.ckpt", float("nan"), 10),
        ("last-v1.ckpt", 2.0, 20),
    ]:
        torch.save({"state_dict": {"w": torch.full((4,), value)}}, folder / name)
        os.utime(folder / name, (1e9 - age, 1e9 - age))
    (folder / "broken.ckpt").write_bytes(b"\0" * 10)
    os.utime(folder / "broken.ckpt", (1e9, 1e9))
    found, skipped = last_finite_checkpoint(checkpoint_candidates([folder]), read_file_weights)
    assert found == folder / "last-v1.ckpt"
    assert skipped[0].startswith("broken.ckpt: unreadable")
    assert skipped[1] == "last.ckpt: holds non-finite weights, 1 of 1 tensors (w)"


def test_one_fused_check_and_one_sync_for_all_tensors(monkeypatch):
    from piip.tasks import finite

    calls = {"norm": 0, "item": 0}
    norm, item = torch._foreach_norm, torch.Tensor.item

    def counting_norm(*args, **kwargs):
        calls["norm"] += 1
        return norm(*args, **kwargs)

    def counting_item(self):
        calls["item"] += 1
        return item(self)

    monkeypatch.setattr(torch, "_foreach_norm", counting_norm)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    tensors = [torch.randn(7) for _ in range(300)] + [torch.randn(3).half(), torch.randn(2).bfloat16()]
    assert finite.maybe_nonfinite([*tensors, torch.arange(3), torch.empty(0)]) is False
    assert calls == {"norm": 1, "item": 1}


def test_the_check_finds_nan_and_inf_in_every_float_dtype_and_ignores_huge_finite_values():
    from piip.tasks.finite import find_nonfinite

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for bad in (float("nan"), float("inf"), float("-inf")):
            named = {"ok": torch.ones(3, dtype=dtype), "bad": torch.tensor([0.0, bad], dtype=dtype)}
            assert find_nonfinite(named) == (True, ["bad"]), (dtype, bad)
    huge = {"w": torch.full((4,), 3e38), "i": torch.arange(4)}  # its L2 norm overflows; it is finite
    assert find_nonfinite(huge) == (False, [])


def check_shards(rank: int, world: int, init_file: str, results: Any) -> None:
    """One rank of a CPU (gloo) group: a weight sharded over the ranks as FSDP2 holds it, NaN in rank 1's
    shard only; reports what the check and the checkpoint refusal said here."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from piip.tasks.finite import find_nonfinite, refuse_nonfinite_checkpoint

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        state = {name: distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)]) for name in ("a", "w")}
        clean = find_nonfinite(state)
        if rank == 1:
            state["w"].to_local()[0, 0] = float("nan")
        found = find_nonfinite(state)
        try:
            refuse_nonfinite_checkpoint(state, "last.ckpt")
            refused = ""
        except CheckpointError as error:
            refused = str(error)
        results.put((rank, clean, found, refused))
    finally:
        dist.destroy_process_group()


def test_sharded_weights_are_checked_per_shard_and_every_rank_stops_together(tmp_path, forkserver):  # noqa: F811
    results = forkserver.Queue()
    ranks = [
        forkserver.Process(target=check_shards, args=(rank, 2, str(tmp_path / "init"), results))
        for rank in range(2)
    ]
    for process in ranks:
        process.start()
    said = dict(sorted((rank, rest) for rank, *rest in (results.get(timeout=120) for _ in ranks)))
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert [said[r][0] for r in (0, 1)] == [(False, []), (False, [])]
    assert said[0][1] == (True, []) and said[1][1] == (True, ["w"])  # both ranks know; rank 1 names it
    assert "on rank 0" in said[0][2] and "another rank's shards" in said[0][2]
    assert "1 of 2 tensors (w) on rank 1" in said[1][2]
