"""Run configuration: defaults, YAML round trip, and errors that name the bad value."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from allocsearch.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    dump_config,
    load_config,
    with_model_defaults,
)


def test_defaults_are_the_demo_settings():
    cfg = config_from_dict({})
    assert cfg == RunConfig()
    assert cfg.model == "demo"
    assert (cfg.supernet.pruner, cfg.search.strategy) == ("sparsegpt", "dp+evopress")
    assert cfg.search.target == 0.6 and cfg.supernet.steps_each_side == 4
    # Ray is the default backend, sized to the machine or cluster once Ray is up
    assert (cfg.backend.kind, cfg.backend.workers, cfg.backend.address) == ("ray", "auto", None)


def test_calibration_rows_default_by_model_kind(tmp_path):
    """Unset data.n_calibration_seqs resolves to 64 rows for a causal LM and 256 for an
    encoder (issue 24: 64 let searches fit MiniLM's calibration rows); a set value wins
    for both kinds, and an unset value survives a YAML round trip."""
    cfg = config_from_dict({})
    assert cfg.data.n_calibration_seqs is None
    assert with_model_defaults(cfg, encoder=False).data.n_calibration_seqs == 64
    assert with_model_defaults(cfg, encoder=True).data.n_calibration_seqs == 256
    assert with_model_defaults(cfg, encoder=True).data.seq_len == cfg.data.seq_len
    mine = config_from_dict({"data": {"n_calibration_seqs": 32}})
    for encoder in (False, True):
        assert with_model_defaults(mine, encoder=encoder).data.n_calibration_seqs == 32
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path).data.n_calibration_seqs is None
    with pytest.raises(ConfigError, match=r"data.n_calibration_seqs = 0 must be >= 1"):
        config_from_dict({"data": {"n_calibration_seqs": 0}})


def test_yaml_round_trip(tmp_path):
    cfg = config_from_dict(
        {
            "model": "/models/llama",
            "data": {"calibration": "corpus/*.txt", "seq_len": 256},
            "supernet": {"pruner": "wanda", "structure": "nm", "nm_patterns": ["1:4", "2:4"]},
            "search": {"strategy": "dp", "target": 0.5, "settings": {"tokens": 1024}},
            "backend": {"kind": "ray", "workers": 4},
        }
    )
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    local = config_from_dict({"backend": {"kind": "local"}})
    assert local.backend.workers == "auto"
    path.write_text(dump_config(local))
    assert load_config(path) == local


@pytest.mark.parametrize(
    "data, message",
    [
        ({"supernet": {"pruner": "obc"}}, r"supernet.pruner = 'obc' is not valid; choose one of"),
        ({"search": {"target": 1.5}}, r"search.target = 1.5 is outside \[0.0, 1.0\]"),
        (
            {"search": {"min_sparsity": 0.8, "max_sparsity": 0.5}},
            r"search.min_sparsity = 0.8 is above search.max_sparsity = 0.5",
        ),
        ({"serach": {}}, r"unknown key\(s\) \['serach'\] in config; valid keys:"),
        ({"data": {"seq_len": "long"}}, r"data.seq_len = 'long' must be an integer"),
        ({"data": {"seq_len": 0}}, r"data.seq_len = 0 must be >= 1"),
        ({"search": {"budget_kind": "latency"}}, r"needs search.latency_table"),
        ({"supernet": {"nm_patterns": ["4:2"]}}, r"entry '4:2' is not 'N:M'"),
        ({"evaluator": {"metric": "topk_kl"}}, r"topk_kl needs a topk >= 1"),
        ({"backend": {"kind": "slurm"}}, r"backend.kind = 'slurm' is not valid"),
        (
            {"backend": {"workers": 0}},
            r"backend.workers = 0 is not valid; use an integer >= 1 or 'auto'",
        ),
        ({"backend": {"workers": "all"}}, r"backend.workers = 'all' is not valid; use an integer"),
        ({"backend": {"workers": 2.5}}, r"backend.workers = 2.5 must be an integer or a string"),
        ({"backend": {"workers": True}}, r"backend.workers = True must be an integer or a string"),
        ({"data": 3}, r"data must be a mapping"),
        (
            {"evaluator": {"micro_batch_tokens": 0}},
            r"evaluator.micro_batch_tokens = 0 must be an integer >= 1",
        ),
        ({"evaluator": {"micro_batch_tokens": 512.0}}, r"micro_batch_tokens = 512.0 must be an"),
        ({"backend": {"replace_timeout_s": 0}}, r"backend.replace_timeout_s = 0.0 must be > 0"),
        (
            {"evaluator": {"stream_unit": "layer"}},
            r"evaluator.stream_unit = 'layer' is not valid; choose one of \['auto', 'block'",
        ),
    ],
)
def test_errors_name_the_value_and_what_is_valid(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
_sections = st.sampled_from(
    ["model", "dtype", "data", "supernet", "search", "evaluator", "backend"]
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.dictionaries(_sections, _values, max_size=4))
def test_random_configs_load_or_raise_config_error(data):
    """Whatever a YAML file holds, loading gives a valid config or a ConfigError."""
    try:
        cfg = config_from_dict(data)
    except ConfigError:
        return
    assert isinstance(cfg, RunConfig)
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_plan_remedy_keys_load_and_cli_errors_name_the_option():
    """The keys the plan's remedies and the Ray settings name load (YAML ints as given,
    seconds as floats); a bad value given on the command line names its option."""
    from typer.testing import CliRunner

    from allocsearch.cli import app

    cfg = config_from_dict(
        {"evaluator": {"micro_batch_tokens": 4096}, "backend": {"replace_timeout_s": 5}}
    )
    assert cfg.evaluator.micro_batch_tokens == 4096
    assert cfg.backend.replace_timeout_s == 5.0
    assert config_from_dict({}).evaluator.micro_batch_tokens == 8192
    r = CliRunner().invoke(app, ["plan", "--micro-batch-tokens", "0"])
    assert r.exit_code == 2
    assert "--micro-batch-tokens: evaluator.micro_batch_tokens = 0 must be" in r.stderr
    r = CliRunner().invoke(app, ["plan", "--steps-each-side", "0"])
    assert r.exit_code == 2 and "--steps-each-side: supernet.steps_each_side = 0" in r.stderr
