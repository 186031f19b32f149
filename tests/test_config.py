import warnings
from dataclasses import fields

import pytest
from trl import TrlParser
from trl.experimental.gkd import GKDConfig

from trl_mgsr import MGSRConfig

BASE = dict(bf16=False, use_cpu=True, report_to="none")


@pytest.mark.parametrize(
    "field,value",
    [
        ("sft_weight", -1.0),
        ("dac_weight", -0.1),
        ("span_weight", "x"),
        ("scrg_rounds", -1),
        ("scrg_kl_direction", "sideways"),
        ("scrg_teacher_token", "beam"),
        ("scrg_error", "last"),
        ("scrg_reject_ratio", 0.0),
        ("scrg_reject_ratio", 1.0),
        ("dac_mode", "adaptive"),
        ("dac_lo", 1.5),
        ("dac_hi", -0.2),
        ("dac_min_width", 0.0),
        ("dac_min_width", 1.2),
        ("dac_sharpness", 0.0),
        ("dac_student_support", "some"),
        ("dac_divergence", "both"),
        ("dac_rescue_weight", -1.0),
        ("dac_temperature", -1.0),
        ("dac_features", 0),
        ("dac_hidden_size", 0),
        ("dac_top_k", 3),
        ("dac_learning_rate", 0.0),
        ("span_extractor", "stanza"),
        ("span_distance", "cosine"),
        ("loss_chunk_size", 0),
        ("schedule", "random"),
        ("init_threshold", 2.0),
        ("threshold_step", -0.1),
        ("loss_eps", -1.0),
        ("replay_capacity", 0),
        ("replay_ratio_start", 1.5),
        ("replay_ratio_end", -0.5),
        ("temperature", 0.0),
        ("temperature", "hot"),
        ("max_new_tokens", 0),
        ("sft_weight", float("nan")),
        ("dac_weight", float("inf")),
        ("dac_min_width", "wide"),
        ("scrg_rounds", True),
        ("scrg_block_size", -1),
        ("scrg_block_size", 2.5),
        ("span_extractor_kwargs", "notjson"),
        ("span_extractor_kwargs", '{"model": 1'),
        ("span_extractor_kwargs", ["model"]),
    ],
)
def test_invalid_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        MGSRConfig("out", **BASE, **{field: value})


def test_band_narrower_than_min_width_is_rejected():
    with pytest.raises(ValueError, match="dac_lo/dac_hi.*dac_min_width"):
        MGSRConfig("out", **BASE, dac_lo=0.3, dac_hi=0.6, dac_min_width=0.5)


def test_all_weights_zero_is_rejected():
    with pytest.raises(ValueError, match="sft_weight, dac_weight and span_weight.*scrg_correction_weight alone"):
        MGSRConfig("out", **BASE, sft_weight=0.0, dac_weight=0.0, span_weight=0.0, scrg_correction_weight=1.0)


def test_rescue_needs_the_full_student_support():
    with pytest.raises(ValueError, match=r"dac_rescue_weight must be 0 with dac_student_support='band'"):
        MGSRConfig("out", **BASE, dac_student_support="band", dac_rescue_weight=1.0)
    assert MGSRConfig("out", **BASE, dac_student_support="band").dac_rescue_weight == 0.0


def test_correction_divergence_is_checked():
    with pytest.raises(ValueError, match=r"scrg_correction_divergence must be one of"):
        MGSRConfig("out", **BASE, scrg_correction_divergence="kl")


def test_gkd_range_checks_still_apply():
    with pytest.raises(ValueError, match="lmbda"):
        MGSRConfig("out", **BASE, lmbda=1.5)


def test_parses_from_command_line_including_dict_fields():
    parser = TrlParser((MGSRConfig,))
    (args,) = parser.parse_args_and_config(
        [
            "--output_dir", "out", "--bf16", "false", "--use_cpu", "true",
            "--dac_mode", "fixed", "--dac_lo", "0.1", "--dac_hi", "0.8",
            "--span_extractor_kwargs", '{"model": "en_core_web_sm"}',
            "--teacher_model_init_kwargs", '{"dtype": "bfloat16"}',
            "--dac_top_k", "64", "--scrg_rounds", "2", "--schedule", "adaptive",
            "--truncate_teacher_vocab", "true",
        ]
    )
    assert isinstance(args, MGSRConfig)
    assert (args.dac_mode, args.dac_lo, args.dac_hi) == ("fixed", 0.1, 0.8)
    assert args.span_extractor_kwargs == {"model": "en_core_web_sm"}
    assert args.teacher_model_init_kwargs == {"dtype": "bfloat16"}
    assert (args.dac_top_k, args.scrg_rounds, args.schedule, args.truncate_teacher_vocab) == (64, 2, "adaptive", True)


def test_invalid_choice_on_command_line_is_rejected():
    parser = TrlParser((MGSRConfig,))
    with pytest.raises(SystemExit):
        parser.parse_args_and_config(["--output_dir", "out", "--dac_mode", "nope"])


def test_every_mgsr_field_has_help():
    own = [f for f in fields(MGSRConfig) if f.name not in {g.name for g in fields(GKDConfig)}]
    assert len(own) >= 30
    for f in own:
        assert f.metadata.get("help"), f.name


def test_readme_table_lists_every_field_with_its_default():
    from dataclasses import MISSING
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for f in fields(MGSRConfig):
        if f.name in {g.name for g in fields(GKDConfig)}:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        assert f"| `{f.name}` | `{default!r}` |" in readme, f.name


def test_mgsr_fields_are_checked_before_trainingarguments_checks():
    """A CPU-only machine with the default bf16=True still gets the MGSR field's own message."""
    with pytest.raises(ValueError, match=r"\bdac_lo\b"):
        MGSRConfig("out", dac_lo=2.0)


def test_span_extractor_kwargs_json_string_is_parsed():
    assert MGSRConfig("out", **BASE, span_extractor_kwargs='{"model": "x"}').span_extractor_kwargs == {"model": "x"}


def test_beta_other_than_gkds_default_warns_that_it_is_ignored():
    with pytest.warns(UserWarning, match=r"beta=1.0 is ignored.*dac_divergence=.jsd."):
        MGSRConfig("out", **BASE, beta=1.0)


def test_replay_buffer_smaller_than_a_batch_is_rejected():
    with pytest.raises(ValueError, match=r"replay_capacity must hold at least one batch"):
        MGSRConfig("out", **BASE, schedule="adaptive", replay_capacity=4, per_device_train_batch_size=8)
    MGSRConfig("out", **BASE, schedule="adaptive", replay_capacity=4, per_device_train_batch_size=8,
               replay_ratio_start=0.0)  # no replay wanted: fine


def test_reversed_band_edges_are_reported_as_reversed():
    with pytest.raises(ValueError, match=r"band edges are reversed \(dac_lo=0.9 > dac_hi=0.1\).*swap"):
        MGSRConfig("out", **BASE, dac_lo=0.9, dac_hi=0.1)


@pytest.mark.parametrize("checkpointing", [None, True, False])
def test_config_raises_no_gradient_checkpointing_deprecation(checkpointing):
    """TRL's default `gradient_checkpointing=True` made every config warn; the value still takes effect."""
    kwargs = {} if checkpointing is None else {"gradient_checkpointing": checkpointing}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = MGSRConfig("out", **BASE, **kwargs)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    expected = True if checkpointing is None else checkpointing  # TRL's default is True
    assert args.activation_checkpointing is expected and args.gradient_checkpointing is expected
