import json
import textwrap

import pytest

import tokenreduce as tr
from tokenreduce import ConfigError, Stage


def write(tmp_path, text):
    p = tmp_path / "pipeline.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_issue_format_loads_into_steps(tmp_path):
    p = write(
        tmp_path,
        """\
        pipeline:
          - {stage: projector, reducer: random, budget: 64, params: {seed: 3}}
          - {stage: llm_layer, layer: 16, reducer: pool, budget: 32}
        positions: original
        """,
    )
    pipe = tr.load_config(p)
    assert [s.stage for s in pipe] == [Stage.PROJECTOR, Stage.LLM_LAYER]
    assert pipe.steps[1].layer == 16
    assert pipe.positions == "original" and pipe.video_budget == "per_frame"
    # The three ways of selecting a reducer give the same object.
    assert pipe.steps[0].reducer == tr.create("random", budget=64, stage="projector", seed=3)
    assert pipe.steps[1].reducer == tr.create("pool", budget=32, stage="llm_layer")


def test_ratio_budget_from_yaml(tmp_path):
    pipe = tr.load_config(write(tmp_path, "pipeline:\n  - {stage: projector, reducer: random, budget: 0.25}\n"))
    assert pipe.steps[0].reducer.budget == 0.25


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "pipeline:\n  - stage: projector\n    reducer: randon\n    budget: 64\n",
            r"pipeline.yaml:3:14: pipeline.0.reducer: unknown reducer 'randon'. Did you mean 'random'\?",
        ),
        (
            "pipeline:\n  - stage: projector\n    reducer: random\n    budget: 64\n    params: {sed: 1}\n",
            r"(?s)pipeline.yaml:5:14: pipeline.0.params.sed: .*sed: Extra inputs are not permitted",
        ),
        (
            "pipeline:\n  - stage: projector\n    reducer: random\n    budget: 64\n    bugdet: 3\n",
            r"pipeline.yaml:5:5: pipeline.0.bugdet: Extra inputs are not permitted",
        ),
        (
            "pipeline:\n  - stage: projecter\n    reducer: random\n    budget: 64\n",
            r"pipeline.yaml:2:12: pipeline.0.stage: Input should be 'vision_encoder', 'projector' or 'llm_layer'",
        ),
        (
            "pipeline:\n  - stage: llm_layer\n    reducer: random\n    budget: 64\n",
            r"pipeline.yaml:2:5: pipeline.0.layer: an llm_layer step needs layer >= 0",
        ),
        (
            "pipeline:\n  - stage: projector\n    reducer: random\n    budget: 0\n",
            r"pipeline.yaml:4:13: pipeline.0.budget: budget=0 is out of range",
        ),
        (
            "pipeline:\n  - stage: projector\n    reducer: random\n    budget: 1.5\n",
            r"pipeline.0.budget: budget=1.5 is out of range: a ratio budget must be in \(0, 1\]",
        ),
        ("pipeline: []\n", r"pipeline.yaml:1:11: pipeline: List should have at least 1 item"),
        ("pipeline:\n  - {stage: projector, reducer: random\n", r"not valid YAML"),
        (
            "pipeline:\n  - {stage: llm_layer, layer: 8, reducer: random, budget: 9}\n"
            "  - {stage: llm_layer, layer: 4, reducer: random, budget: 9}\n",
            r"increasing layers",
        ),
    ],
)
def test_errors_point_at_line_and_field(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        tr.load_config(write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        tr.load_config(tmp_path / "nope.yaml")


def test_json_schema_lists_reducers_and_their_params():
    schema = tr.json_schema()
    text = json.dumps(schema)
    assert schema["title"] == "tokenreduce pipeline"
    for name in ("random", "pool"):
        assert f'"const": "{name}"' in text
    assert "Seed of the random scores" in text  # a parameter description reaches editors


def test_pipeline_coerce_accepts_reducers_and_lists():
    r = tr.create("random", budget=4, stage="vision_encoder")
    pipe = tr.Pipeline.coerce([r, tr.create("pool", budget=4)])
    assert [s.stage for s in pipe] == [Stage.VISION_ENCODER, Stage.PROJECTOR]
    with pytest.raises(ConfigError, match="needs a layer"):
        tr.Pipeline.coerce(tr.create("random", budget=4, stage="llm_layer"))
    with pytest.raises(ConfigError, match="appears twice"):
        tr.Pipeline.coerce([tr.create("random", budget=4), tr.create("pool", budget=4)])
