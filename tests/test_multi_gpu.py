"""configs/multi_gpu_train.json: two CPU processes (gloo) train one tiny epoch of the target stage with torchrun and
end with identical weights; file-writing handlers run on rank 0 only; both stages resolve their ids."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # trains networks, runs subprocesses or the real apps

CONFIGS = REPO / "configs"
# test-only override: every rank saves its weights and pid before the process group is torn down
SAVE_RANK_STATE = {
    "finalize": [
        "$torch.save({'pid': os.getpid(), 'state': {k: v.detach().cpu() for k, v in "
        "@network.module.state_dict().items()}}, @bundle_root + '/rank' + str(dist.get_rank()) + '.pt')",
        "$dist.is_initialized() and dist.barrier()",
        "$idist.finalize()",
        "$dist.is_initialized() and dist.destroy_process_group()",
    ]
}


def _files(stage: str) -> list[str]:
    """A stage's configs for multi-GPU training, in the documented order: the overlays after the stage."""
    return [str(CONFIGS / f) for f in ("train.json", f"stage_{stage}.json", "resilience.json", "multi_gpu_train.json")]


def _merged(stage: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(_files(stage))
    return parser


@pytest.mark.parametrize("stage", ["intermediate", "target"])
def test_merged_config_shape(stage):
    parser = _merged(stage)
    assert "rank0_only(@train#handlers)" in parser["train#trainer#train_handlers"]
    assert "rank0_only(@validate#handlers)" in parser["validate#evaluator#val_handlers"]
    assert parser["train#dataloader#sampler"] == "@train#sampler" and parser["train#dataloader#shuffle"] is False
    assert parser["validate#dataloader#sampler"] == "@validate#sampler"
    assert "init_process_group" in parser["initialize"][0]
    assert "destroy_process_group" in parser["finalize"][-1]
    assert parser["finalize"][1:] == SAVE_RANK_STATE["finalize"][2:]  # the test-only override keeps the teardown


def test_rank0_only_drops_file_writers_on_other_ranks(tmp_path):
    from monai.handlers import CheckpointSaver, StatsHandler, ValidationHandler

    from scripts.engine.handlers import rank0_only

    net = torch.nn.Linear(1, 1)
    saver = CheckpointSaver(str(tmp_path), {"model": net}, save_final=True)
    stats, val = StatsHandler(), ValidationHandler(interval=1)
    assert rank0_only([stats, saver, val, None], rank=0) == [stats, saver, val]
    assert rank0_only([stats, saver, val], rank=1) == [stats, val]
    assert rank0_only(None) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage,other_rank", [("intermediate", False), ("target", False), ("target", True)])
def test_both_stages_resolve_in_a_one_process_group(stage, other_rank, tiny_data, tmp_path, monkeypatch):
    """check_properties() == [] for the merged config, with the process group made (gloo) and torn down. TensorBoard
    handlers open their event file when created: on a rank > 0 (simulated by ``is_not_rank0``) none is created."""
    from monai.handlers import TensorBoardStatsHandler

    for k, v in dict(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    wf = ConfigWorkflow(
        config_file=_files(stage),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(tmp_path),
        dataset_dir=str(tiny_data),
        arch="resnet18",
        image_size=64,
        init="scratch",
        **({"is_not_rank0": True} if other_rank else {}),
    )
    wf.initialize()
    try:
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
        assert wf.check_properties() == []
        for lst in ("train#handlers", "validate#handlers"):
            handlers = wf.parser.get_parsed_content(lst)
            assert any(isinstance(h, TensorBoardStatsHandler) for h in handlers) is not other_rank, lst
            assert all(h is not None for h in handlers)
        net = wf.parser.get_parsed_content("network")
        assert isinstance(net, torch.nn.parallel.DistributedDataParallel)
        assert wf.parser.get_parsed_content("validate#evaluator").network is net.module
    finally:
        wf.finalize()
    assert not torch.distributed.is_initialized()


def test_torchrun_two_cpu_ranks_end_with_identical_weights(tiny_data, tmp_path):
    extra = tmp_path / "save_rank_state.json"
    extra.write_text(json.dumps(SAVE_RANK_STATE))
    bundle = tmp_path / "bundle"
    configs = _files("target") + [str(extra)]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(configs),
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--logging_file",
        str(CONFIGS / "logging.conf"),
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(tiny_data),
        "--arch",
        "resnet18",
        "--image_size",
        "64",
        "--init",
        "scratch",
        "--batch_size",
        "4",
        "--amp",
        "False",
        "--train#trainer#max_epochs",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    r0 = torch.load(bundle / "rank0.pt", weights_only=True)
    r1 = torch.load(bundle / "rank1.pt", weights_only=True)
    assert r0["pid"] != r1["pid"]
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # parameters and BatchNorm statistics
    # rank 0 wrote the checkpoint (without DDP's "module." prefix), and it holds the shared weights
    saved = torch.load(bundle / "models" / "target_fold0" / "model.pt", weights_only=True)
    assert saved.keys() == r0["state"].keys()  # no DDP "module." prefix
    assert all(torch.equal(saved[k], r0["state"][k]) for k in saved)  # one epoch: the best is the last
    # every TensorBoard event file comes from rank 0's process (file names end in .<host>.<pid>.<n>)
    events = [e.name for e in (bundle / "runs" / "target_fold0").glob("events.out.tfevents.*")]
    assert events and all(f".{r0['pid']}." in e and f".{r1['pid']}." not in e for e in events), events
