"""The captured loop as CUDA graphs per step: the same latents as the whole loop in one
graph, the UNet's call recorded once and replayed by every step (the same latents as the
UNet recorded into every step's graph), a report after every step while the next steps run,
a report that raises stops the replay, and the streaming model's jobs run on these graphs.
Skips without CUDA."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from sd_backend.config import DeploymentConfig, FastPathOptions  # noqa: E402
from sd_backend.fast.graphs import LoopGraphs  # noqa: E402
from sd_backend.stages import DenoiseJob, UNetStage  # noqa: E402
from sd_backend.streaming import Cancelled  # noqa: E402

STEPS = 8
SCHEDULERS = ("pndm", "euler_a", "dpmpp_2m")


@pytest.fixture(scope="module")
def stage(cache_dir):
    from sd_backend.offline import write_offline_model

    model_dir = write_offline_model("tiny", cache_dir / "tiny")
    config = DeploymentConfig(model=str(model_dir), opt_level="triton", fast_path=FastPathOptions(), batch_buckets=(1, 4))
    stage = UNetStage.from_config(config, capture=False)
    for name in SCHEDULERS:
        stage.graphs.capture(stage.check(seed=0, steps=STEPS, scheduler=name), (1, 4))
    return stage


def _jobs(stage, scheduler, seeds, progress=None):
    hidden = stage.unet.config.cross_attention_dim
    jobs = []
    for i, s in enumerate(seeds):
        gen = torch.Generator().manual_seed(s)
        params = stage.check(seed=s, steps=STEPS, scheduler=scheduler)
        job = DenoiseJob(params, *(torch.randn(77, hidden, generator=gen) for _ in range(2)))
        job.progress = None if progress is None else progress[i]
        jobs.append(job)
    return jobs


class Recorder:
    """A JobProgress stand-in: keeps each report's latents; cancels after `cancel_at` steps."""

    def __init__(self, cancel_at: int | None = None):
        self.reports, self.cancel_at, self.cancelled = [], cancel_at, False

    def report(self, index, total, latents):
        if self.cancel_at is not None and index + 1 >= self.cancel_at:
            self.cancelled = True
        self.reports.append((index, total, latents.clone()))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_step_graphs_give_the_whole_loop_graphs_latents(stage, scheduler):
    jobs = _jobs(stage, scheduler, [3, 4, 5])  # 3 in the bucket of 4
    steps = torch.cat(stage(jobs))
    whole = LoopGraphs(stage, stage.graphs.hoist, step_graphs=False)
    whole.capture(jobs[0].params, (4,))
    graphs, stage.graphs = stage.graphs, whole
    try:
        assert whole.find(jobs[0].params, 3).graphs.__len__() == 1
        one_graph = torch.cat(stage(jobs))
    finally:
        stage.graphs = graphs
    assert len(graphs.find(jobs[0].params, 3).graphs) == len(graphs.find(jobs[0].params, 3).step_outputs) >= STEPS
    assert torch.equal(steps, one_graph)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_step_replays_one_unet_graph_with_the_per_step_recordings_latents(stage, scheduler):
    jobs = _jobs(stage, scheduler, [3, 4, 5])
    loop = stage.graphs.find(jobs[0].params, 3)
    assert stage.graphs.hoist and loop.unet_call is not None
    assert all(len(step) == 3 and step[1] is loop.unet_call.graph for step in loop.graphs)
    shared = torch.cat(stage(jobs))
    per_step = LoopGraphs(stage, stage.graphs.hoist, unet_graph=False)
    per_step.capture(jobs[0].params, (4,))
    graphs, stage.graphs = stage.graphs, per_step
    try:
        recorded = per_step.find(jobs[0].params, 3)
        assert recorded.unet_call is None and all(len(step) == 1 for step in recorded.graphs)
        every_step = torch.cat(stage(jobs))
    finally:
        stage.graphs = graphs
    assert torch.equal(shared, every_step)
    assert not torch.equal(shared[0], shared[1])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_step_is_reported_and_the_latents_are_unchanged(stage, scheduler):
    plain = torch.cat(stage(_jobs(stage, scheduler, [7, 8])))
    recorders = [Recorder(), None]  # a stream and an ensemble request in one batch
    reported = torch.cat(stage(_jobs(stage, scheduler, [7, 8], recorders)))
    assert torch.equal(reported, plain)
    reports = recorders[0].reports
    total = len(stage.graphs.find(_jobs(stage, scheduler, [7])[0].params, 2).graphs)
    assert [(i, t) for i, t, _ in reports] == [(i, total) for i in range(total)]
    assert torch.equal(reports[-1][2], plain[:1].to(reports[-1][2].dtype))  # the last report is its own final latents
    assert not torch.equal(reports[0][2], reports[-1][2])


def test_a_batch_whose_streams_all_cancel_stops_and_the_next_replay_is_whole(stage):
    plain = stage(_jobs(stage, "euler_a", [9]))[0]
    recorder = Recorder(cancel_at=2)
    with pytest.raises(Cancelled):
        stage.run_group(_jobs(stage, "euler_a", [9], [recorder]))
    assert len(recorder.reports) == 2  # stopped at the report after the cancel
    assert torch.equal(stage(_jobs(stage, "euler_a", [9]))[0], plain)


def test_a_cancelled_stream_in_a_batch_leaves_the_others_their_images(stage):
    plain = torch.cat(stage(_jobs(stage, "pndm", [1, 2])))
    recorders = [Recorder(cancel_at=1), Recorder()]
    results = stage(_jobs(stage, "pndm", [1, 2], recorders))
    assert torch.equal(results[1], plain[1:])
    assert len(recorders[1].reports) == len(recorders[0].reports)  # the loop ran on; reports go on to the live one
