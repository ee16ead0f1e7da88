"""The temporal context (``frames``, ``frame_index``) that adapters give whole-video rows, and its refusals."""

from __future__ import annotations

from typing import ClassVar

import pytest
import test_adapter_onevision as onevision
import torch
from models import one_thread, qwen_vl_inputs, tiny_onevision, tiny_qwen2_5_vl  # noqa: F401 - fixture

import tokenreduce
from tokenreduce import MissingContextError, Pipeline, Stage, Step
from tokenreduce.reducer import ScoringReducer

pytestmark = pytest.mark.usefixtures("one_thread")


class FirstFrames(ScoringReducer):
    """Keeps the earliest tokens (scores fall with the frame), recording the temporal context it got."""

    name = "first-frames-test"
    required_context: ClassVar[frozenset[str]] = frozenset({"frames", "frame_index"})
    seen: ClassVar[list] = []

    def score(self, tokens, valid, context):
        FirstFrames.seen.append((context.stage, context.frames, context.frame_index.clone(), context.grid))
        n = tokens.shape[1]
        return -(context.frame_index * n + torch.arange(n, device=tokens.device)).float()


def run(model, kw, stages, video_budget="per_video"):
    FirstFrames.seen.clear()
    steps = [Step(stage, FirstFrames(0.5, stage=stage)) for stage in stages]
    with tokenreduce.apply(model, Pipeline(steps, video_budget=video_budget)) as handle:
        with torch.no_grad():
            model(**kw)
        return handle.records


@pytest.mark.parametrize("stages", [[Stage.PROJECTOR], [Stage.VISION_ENCODER, Stage.PROJECTOR]])
def test_onevision_video_rows_carry_their_frames(stages):
    model = tiny_onevision(0)
    kw = onevision.make_inputs()([1])  # one 3-frame video
    records = run(model, kw, stages)
    first = FirstFrames.seen[0]
    _, frames, frame_index, grid = first
    n = frame_index.shape[1]
    per_frame = n // onevision.FRAMES
    assert frames == onevision.FRAMES
    assert grid == (onevision.FRAMES * grid[1], grid[1]) and grid[0] * grid[1] == n
    assert torch.equal(frame_index[0], torch.arange(n) // per_frame)
    # Half of the video is kept: the first frames first, so the first step keeps frame 0 whole.
    kept = records[0].indices[0]
    assert torch.equal(kept, torch.arange(len(kept)))
    if len(stages) == 2:  # the second step sees the frames of the tokens the first one kept
        _, frames2, frame_index2, grid2 = FirstFrames.seen[1]
        assert frames2 == onevision.FRAMES and grid2 is None
        assert torch.equal(frame_index2[0], kept // per_frame)


def test_qwen_whole_videos_carry_their_frames():
    model = tiny_qwen2_5_vl(0)
    # grid_thw (4, 4, 8): 4 temporal patches ("frames") of 2x4 merged tokens.
    kw = qwen_vl_inputs([[]], [[(4, 4, 8)]])
    run(model, kw, [Stage.PROJECTOR])
    ((stage, frames, frame_index, grid),) = FirstFrames.seen
    assert stage is Stage.PROJECTOR and frames == 4 and grid == (8, 4)
    assert torch.equal(frame_index[0], torch.arange(32) // 8)


def test_qwen_images_beside_a_whole_video_get_no_frames():
    model = tiny_qwen2_5_vl(0)
    kw = qwen_vl_inputs([[(4, 4)]], [[(2, 4, 4)]])
    with pytest.raises(MissingContextError, match="frames"):
        run(model, kw, [Stage.PROJECTOR])


@pytest.mark.parametrize("build", [tiny_onevision, tiny_qwen2_5_vl])
def test_per_frame_budgets_refuse_a_reducer_that_needs_frames(build):
    model = build(0)
    pipe = Pipeline([Step(Stage.PROJECTOR, FirstFrames(0.5, stage=Stage.PROJECTOR))])
    with pytest.raises(MissingContextError, match="per_video"), tokenreduce.apply(model, pipe):
        pass
