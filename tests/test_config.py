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


# -- issue 16: no silent result -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # YAML 1.1 booleans were read as budget 1 and layer 1.
        (
            "pipeline:\n  - {stage: projector, reducer: random, budget: true}\n",
            r"pipeline.yaml:2:49: pipeline.0.budget: budget=True is not a budget: budget must be a positive int",
        ),
        (
            "pipeline:\n  - stage: projector\n    reducer: random\n    budget: yes\n",
            r"pipeline.yaml:4:13: pipeline.0.budget: budget=True is not a budget",
        ),
        (
            "pipeline:\n  - {stage: llm_layer, layer: true, reducer: random, budget: 8}\n",
            r"pipeline.yaml:2:31: pipeline.0.layer: Input should be a valid integer \(got True\)",
        ),
        # Quoted numbers were coerced.
        (
            "pipeline:\n  - {stage: projector, reducer: random, budget: '64'}\n",
            r"pipeline.yaml:2:49: pipeline.0.budget: budget='64' has type str",
        ),
        # The last of two keys used to win.
        (
            "pipeline:\n  - stage: projector\n    reducer: random\n    budget: 64\n    budget: 32\n",
            r"pipeline.yaml:5:5: pipeline.0.budget: duplicate key 'budget' \(first given on line 4\)",
        ),
        (
            "pipeline:\n  - {stage: projector, reducer: random, budget: 0}\n",
            r"budget=0 is out of range: an absolute budget must be >= 1; budget must be a positive int "
            r"\(tokens to keep\) or a ratio in \(0, 1\]",
        ),
        (
            "pipeline:\n  - {stage: projector, reducer: random, bugdet: 4}\n",
            r"pipeline.yaml:2:41: pipeline.0.bugdet: Extra inputs are not permitted \(got 4\)\. Did you mean 'budget'\?",
        ),
        (
            "pipeline:\n  - {stage: llm_layer, layer: 0, reducer: fastv, budget: 64}\n",
            r"pipeline.yaml:2:31: pipeline.0.layer: reducer 'fastv' reads the attention of the previous layer, "
            r"so its layer must be >= 1, got layer=0",
        ),
        ("pipeline:\n\t- {stage: projector, reducer: random, budget: 4}\n", r"pipeline.yaml:2:1: not valid YAML: .*tabs"),
        ("- {stage: projector, reducer: random, budget: 4}\n", r"pipeline.yaml:1:1: \(root\): the top level must be a mapping"),
    ],
)
def test_values_yaml_would_coerce_are_errors_with_line_and_field(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        tr.load_config(write(tmp_path, text))


def test_merge_keys_may_override_without_counting_as_duplicates(tmp_path):
    pipe = tr.load_config(
        write(
            tmp_path,
            """\
            pipeline:
              - &first {stage: projector, reducer: random, budget: 64, params: {seed: 2}}
              - {<<: *first, stage: vision_encoder, budget: 128}
            """,
        )
    )
    assert [(s.stage, s.reducer.budget, s.reducer.params.seed) for s in pipe] == [
        (Stage.PROJECTOR, 64, 2),
        (Stage.VISION_ENCODER, 128, 2),
    ]


def test_a_non_utf8_file_is_a_clear_error(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("pipeline:\n  # résumé\n  - {stage: projector, reducer: random, budget: 64}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml:2:6: the file is not UTF-8 text \(byte e9\); save it as UTF-8"):
        tr.load_config(p)
    # UTF-8 with a byte-order mark, and UTF-16 with one, are read.
    for encoding in ("utf-8-sig", "utf-16"):
        p.write_bytes("pipeline:\n  - {stage: projector, reducer: random, budget: 64}\n".encode(encoding))
        assert tr.load_config(p).steps[0].reducer.budget == 64


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        tr.load_config(tmp_path)


def test_validate_config_runs_the_checks_run_makes_without_a_model(tmp_path):
    from tokenreduce.config import validate_config

    apet = write(tmp_path, "pipeline:\n  - {stage: projector, reducer: apet, budget: 5, params: {basis_tokens: 10}}\n")
    tr.load_config(apet)  # well formed
    with pytest.raises(ConfigError, match=r"pipeline.yaml:2:5: pipeline.0: step 0 \(apet at projector\) .*basis_tokens=10"):
        validate_config(apet)
    ok = write(tmp_path, "pipeline:\n  - {stage: projector, reducer: apet, budget: 11, params: {basis_tokens: 10}}\n")
    assert validate_config(ok).steps[0].reducer.budget == 11


def test_steps_built_in_python_follow_the_same_rules():
    with pytest.raises(ConfigError, match="layer must be >= 1, got layer=0"):
        tr.Step("llm_layer", tr.create("fastv", budget=8), layer=0)
    with pytest.raises(ConfigError, match=r"needs layer >= 0 \(an int\), got layer=True"):
        tr.Step("llm_layer", tr.create("random", budget=8), layer=True)
    assert tr.Step("llm_layer", tr.create("fastv", budget=8), layer=1).layer == 1
