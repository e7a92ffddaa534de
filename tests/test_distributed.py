"""Data parallelism (fdiv_align/training/distributed.py) against the single-process run.

The trainer tests launch `torchrun` with 2 CPU processes (gloo) on tests/dist_worker.py and compare with 1
process, same global batch and seed. They are marked ``distributed`` (about 5 minutes on 2 cores: not in
the default suite; `.ci/run` runs them with `make test-distributed`).

Tolerance. The 2-process runs sample the same tokens (inverse CDF from the same uniforms) and compute Ẑ,
baselines and metrics from the same gathered vectors; what differs is the order of floating-point sums:
each rank's fp32 gradient is summed by the engine (DDP all-reduce, FSDP reduce-scatter) instead of being
accumulated in one backward, and FSDP's gathered parameters are used by other GEMM blockings. That
perturbs a step's gradient by O(ε_fp32 = 6e-8) relative; AdamW with lr 1e-2 turns it into parameter
differences of O(lr·1e-4) at worst (its update divides by √v, so a relative gradient error becomes a
relative update error) over 4 steps, and the logged metrics — smooth functions of fp32 log-probs of
magnitude ≤ 30 — move by at most ~30× that. Measured (AMD EPYC, 2026-12-02): ≤ 2.2e-6 on the parameters,
≤ 2.4e-5 absolute (grad_norm 15.3) on the metrics. Asserted: parameters within 1e-5, metrics within 1e-4
absolute + 1e-4 relative — far below any change of the samples (which must be identical) or of a step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
TIMING = ("seconds", "seconds_sample", "seconds_score", "seconds_update", "samples_per_second")
PARAM_ATOL = 1e-5
METRIC_ATOL = METRIC_RTOL = 1e-4


# ---------------------------------------------------------------------------------------- collectives
def _collectives_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from fdiv_align.training.distributed import Group

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = Group()
        n = 7
        shard = group.shard(n)
        rows = torch.arange(n, dtype=torch.float64)[shard] * 1.5
        texts = ["", "é→∑", "plain", "x" * 300, "日本語", "a\nb", "last"][shard]
        result = {
            "shard": [shard.start, shard.stop],
            "gather": group.gather(rows).tolist(),
            "gather_2d": group.gather(torch.stack([rows, -rows], 1)).tolist(),
            "gather_bool": group.gather(rows > 4).tolist(),
            "gather_empty_local": group.gather(torch.arange(rank, dtype=torch.int64)).tolist(),
            "texts": group.gather_texts(texts),
            "sum": group.sum(float(rank + 1)),
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_group_gathers_uneven_parts_and_texts_in_rank_order(tmp_path):
    """2 processes: contiguous shards differing by at most one row; tensors (float, 2-D, bool, one rank
    empty) and UTF-8 strings gathered in rank order with tensor collectives; sums."""
    import torch.multiprocessing as mp

    mp.spawn(_collectives_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["shard"] == [0, 3] and r1["shard"] == [3, 7]
    everything = [i * 1.5 for i in range(7)]
    texts = ["", "é→∑", "plain", "x" * 300, "日本語", "a\nb", "last"]
    for r in (r0, r1):
        assert r["gather"] == everything
        assert r["gather_2d"] == [[v, -v] for v in everything]
        assert r["gather_bool"] == [v > 4 for v in everything]
        assert r["gather_empty_local"] == [0]  # rank 0 sends nothing, rank 1 sends [0]
        assert r["texts"] == texts
        assert r["sum"] == 3.0


def test_one_process_is_the_identity():
    from fdiv_align.training.distributed import Group

    group = Group()
    x = torch.arange(5.0)
    assert (group.world, group.rank) == (1, 0) and group.shard(5) == slice(0, 5)
    assert group.gather(x) is x and group.gather_texts(["a"]) == ["a"] and group.sum(2.5) == 2.5


# ---------------------------------------------------------------------------------------- the trainer
def _torchrun(nproc: int, out, over: dict | None = None) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = 29400 + (os.getpid() * 7 + nproc * 131 + len(str(out))) % 500
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
                          str(port), WORKER, str(out), json.dumps(over or {})],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(reference, other, ranks=(0, 1)) -> None:
    """Every logged record equal within the tolerance of the module docstring; the samples identical; the
    final parameters of every rank within PARAM_ATOL of the reference's."""
    mine, theirs = _records(reference), _records(other)
    assert [(r["step"], r["kind"]) for r in mine] == [(r["step"], r["kind"]) for r in theirs]
    for a, b in zip(mine, theirs):
        assert set(a) == set(b), (a["step"], set(a) ^ set(b))
        for key in a:
            if key in TIMING or not isinstance(a[key], float):
                assert key in TIMING or a[key] == b[key], (a["step"], key, a[key], b[key])
                continue
            assert b[key] == pytest.approx(a[key], abs=METRIC_ATOL, rel=METRIC_RTOL, nan_ok=True), (a["step"], key)
    assert (reference / "samples.jsonl").read_text() == (other / "samples.jsonl").read_text()
    one = torch.load(reference / "params-rank0.pt")
    for rank in ranks:
        two = torch.load(other / f"params-rank{rank}.pt")
        assert set(one) == set(two)
        diff = max(float((one[n] - two[n]).abs().max()) for n in one)
        assert diff <= PARAM_ATOL, (rank, diff)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The 1-process reference runs (full fine-tuning, LoRA), made once."""
    made = {}

    def run(lora: bool):
        if lora not in made:
            out = tmp_path_factory.mktemp(f"np1-lora{int(lora)}")
            _torchrun(1, out, {"model": {"lora": lora}})
            made[lora] = out
        return made[lora]

    return run


@pytest.mark.distributed
@pytest.mark.parametrize("parallel,lora", [("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)])
def test_two_processes_equal_one(tmp_path, single_process, parallel, lora):
    """torchrun, 2 CPU processes (gloo): the run of 1 process with the same global batch and seed, step by
    step; under FSDP each rank holds half of every parameter, and final_model/ is written from the shards."""
    _torchrun(2, tmp_path, {"model": {"lora": lora}, "trainer": {"parallel": parallel}})
    assert_same_run(single_process(lora), tmp_path)
    layout = json.loads((tmp_path / "layout-rank1.json").read_text())
    if parallel == "fsdp":
        assert layout["sharded"] and layout["local_numel"] <= layout["ceil_share"] < layout["numel"]
    else:
        assert not layout["sharded"] and layout["local_numel"] == layout["numel"]
    assert (tmp_path / "final_model" / ("adapter_config.json" if lora else "config.json")).is_file()


@pytest.mark.distributed
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_a_run_resumes_at_another_world_size(tmp_path, single_process, first, then):
    """FSDP, LoRA: 2 steps on ``first`` processes with a checkpoint, then resumed to 4 steps on ``then``
    processes: the same run as 4 steps on 1 process."""
    over = {"model": {"lora": True}, "trainer": {"parallel": "fsdp", "checkpoint_every": 2}}
    _torchrun(first, tmp_path, {**over, "trainer": {**over["trainer"], "steps": 2}})
    assert (tmp_path / "checkpoints" / "checkpoint-00000002").is_dir()
    _torchrun(then, tmp_path, over)
    assert_same_run(single_process(True), tmp_path, ranks=range(then))
    # an FSDP group writes sharded checkpoints: each rank its own shard file (DCP), the manifest covering them
    last = tmp_path / "checkpoints" / "checkpoint-00000004"
    if then == 2:
        assert sorted(p.name for p in (last / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert "trainable" not in torch.load(last / "state.pt", weights_only=False)
    # fdiv-align-export from the step-4 checkpoint (sharded or whole) writes the adapters the run's final_model has
    from safetensors.torch import load_file

    from fdiv_align.training.export import export_checkpoint

    exported = load_file(export_checkpoint(tmp_path, step=4, out=tmp_path / "exported") / "adapter_model.safetensors")
    final = load_file(tmp_path / "final_model" / "adapter_model.safetensors")
    assert set(exported) == set(final) and all(torch.equal(exported[k], final[k]) for k in final)


def test_fsdp_refuses_a_batch_the_processes_cannot_split_evenly():
    """Under FSDP every pass is a collective: a batch that is not a multiple of the world size is refused
    by name before anything loads (checked here with a stand-in group of 3)."""
    from conftest import tiny_cfg

    from fdiv_align.training import trainer as trainer_module

    class Three:
        rank, world = 0, 3

    cfg = tiny_cfg(trainer={"parallel": "fsdp", "samples_per_step": 8})
    original = trainer_module.process_group
    trainer_module.process_group = Three
    try:
        with pytest.raises(ValueError, match=r"trainer.parallel=fsdp: trainer.samples_per_step=8 must be a multiple of the 3"):
            trainer_module.Trainer(cfg, output_dir="/nonexistent/never-created")
        cfg = tiny_cfg(trainer={"parallel": "ddp", "samples_per_step": 2})
        with pytest.raises(ValueError, match=r"trainer.samples_per_step=2 is smaller than the 3 processes"):
            trainer_module.Trainer(cfg, output_dir="/nonexistent/never-created")
    finally:
        trainer_module.process_group = original


@pytest.mark.distributed
def test_a_rank_that_dies_ends_the_group_and_a_restart_resumes_it(tmp_path, single_process):
    """Rank 1 is killed (SIGKILL) after step 3 of 4 (checkpoints every 2 steps). Without restarts, rank 0
    does not wait: torchrun ends the group at once and names the dead rank. With `--max-restarts 1`, the
    restarted group resumes from the step-2 checkpoint and finishes as the uninterrupted 1-process run."""
    over = {"model": {"lora": True}, "trainer": {"parallel": "fsdp", "checkpoint_every": 2},
            "die": {"rank": 1, "after_step": 3}}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for restarts, out in ((0, tmp_path / "no-restart"), (1, tmp_path / "restart")):
        port = 29950 + restarts + os.getpid() % 40
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--max-restarts={restarts}",
                              "--master_port", str(port), WORKER, str(out), json.dumps(over)],
                             capture_output=True, text=True, timeout=600, env=env)
        if restarts == 0:
            assert res.returncode != 0
            assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", res.stderr), res.stderr[-3000:]
            assert time.monotonic() - t0 < 120
            assert [r["step"] for r in _records(out) if r["kind"] == "train"][-1] <= 4
        else:
            assert res.returncode == 0, res.stderr[-4000:]
            assert_same_run(single_process(True), out)


def _one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg-store'}", rank=0, world_size=1)


def test_a_crash_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """save_sharded_checkpoint: a failure after the shards are written (here: the manifest cannot be written)
    leaves no checkpoint-4 and checkpoint-2 intact and loadable; a damaged shard fails verification, so
    resume falls back to the previous checkpoint; load_sharded fills whole tensors in place."""
    import torch.distributed as dist

    from fdiv_align.training import checkpoint as ck

    _one_process_group(tmp_path)
    try:
        root = tmp_path / "checkpoints"
        weights = {"w": torch.arange(6.0).reshape(2, 3)}
        ck.save_sharded_checkpoint(root, 2, {"step": 2}, {"trainable": weights}, keep=3, writer=True)

        def fail(*args, **kwargs):
            raise OSError("disk full")

        with monkeypatch.context() as m:  # the shards and state.pt are written; the manifest is not
            m.setattr(ck, "_write_manifest", fail)
            with pytest.raises(OSError, match="disk full"):
                ck.save_sharded_checkpoint(root, 4, {"step": 4}, {"trainable": {"w": weights["w"] + 1}}, keep=3,
                                           writer=True)
        assert [p.name for p in ck.list_checkpoints(root)] == ["checkpoint-00000002"]
        step, state, path = ck.load_latest(root)
        loaded = ck.load_sharded(path, {"trainable": {"w": torch.zeros(2, 3)}})
        assert (step, state) == (2, {"step": 2}) and torch.equal(loaded["trainable"]["w"], weights["w"])

        ck.save_sharded_checkpoint(root, 6, {"step": 6}, {"trainable": {"w": weights["w"] * 2}}, keep=3, writer=True)
        shard = next((root / "checkpoint-00000006" / "sharded").glob("*.distcp"))
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
        with pytest.warns(RuntimeWarning, match="checkpoint-00000006"):
            assert ck.load_latest(root)[0] == 2
    finally:
        dist.destroy_process_group()
