"""FlashPrefillConfig: defaults, validation of every key, FLASHPREFILL_* overrides, dense layers."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from vllm_flashprefill.config import PATTERNS, FlashPrefillConfig, option_name

pytestmark = pytest.mark.usefixtures("clean_flashprefill_env")


def load(options, environ=None):
    """What the backend does: options under additional_config["flashprefill"], then env."""
    return FlashPrefillConfig.from_additional_config(
        {"flashprefill": options}, environ={} if environ is None else environ
    )


# --- defaults -------------------------------------------------------------------------------------


def test_defaults_are_valid():
    default = FlashPrefillConfig()
    assert default.pattern in PATTERNS
    assert default.sparse_block >= 64 and default.sparse_block & (default.sparse_block - 1) == 0
    assert 0.0 <= default.threshold <= 1.0
    # Re-validating the default values through the dict path gives the same config.
    assert FlashPrefillConfig.from_dict(default.as_dict()) == default


@pytest.mark.parametrize(
    "additional_config",
    [
        None,
        {},
        {"flashprefill": {}},
        # Keys of vLLM itself or of other plugins are not ours to check.
        {"gdn_prefill_backend": "triton", "ascend": {"x": 1}},
        "not-a-mapping",
    ],
    ids=["none", "empty", "empty-section", "other-keys", "non-mapping"],
)
def test_missing_section_means_defaults(additional_config):
    cfg = FlashPrefillConfig.from_additional_config(additional_config, environ={})
    assert cfg == FlashPrefillConfig()


def test_every_field_can_be_set():
    options = {
        "pattern": "HYBRID",  # case-insensitive
        "block_size": 256,
        "sink_blocks": 0,
        "local_blocks": 4,
        "stride": 8,
        "threshold": 1,  # an int is a number
        "above_mean": "1.5",  # the env/CLI spelling
        "min_budget": 2,
        "max_budget": 32,
        "min_seq_len": 0,
        "dense_tail_blocks": 1,
        "dense_layers": [0, 3],
        "sparse_kernel": "FLASH_ATTN",
    }
    assert set(options) == {option_name(f.name) for f in dataclasses.fields(FlashPrefillConfig)}
    cfg = load(options)
    assert cfg == FlashPrefillConfig(
        pattern="hybrid",
        sparse_block=256,
        sink_blocks=0,
        local_blocks=4,
        stride=8,
        threshold=1.0,
        above_mean=1.5,
        min_budget=2,
        max_budget=32,
        min_seq_len=0,
        dense_tail_blocks=1,
        dense_layers=(0, 3),
        sparse_kernel="flash_attn",
    )
    assert isinstance(cfg.threshold, float)
    hash(cfg)  # frozen and hashable: a list was turned into a tuple


def test_summary_names_every_field():
    summary = load({"pattern": "local", "stride": 4}).summary()
    for field in dataclasses.fields(FlashPrefillConfig):
        assert f"{option_name(field.name)}=" in summary
    assert "pattern=local" in summary
    assert load({"pattern": "local"}).as_dict() == {
        **{option_name(f.name): f.default for f in dataclasses.fields(FlashPrefillConfig)}, "pattern": "local"
    }


# --- invalid configs ------------------------------------------------------------------------------

# (options under "flashprefill", key the message must name, text of the bad value it must show)
BAD_CONFIGS = [
    ({"patern": "hybrid"}, "patern", "'hybrid'"),
    ({"pattern": 3}, "pattern", "3"),
    ({"pattern": "sparse"}, "pattern", "'sparse'"),
    ({"pattern": None}, "pattern", "None"),
    ({"block_size": "abc"}, "block_size", "'abc'"),
    ({"block_size": 100}, "block_size", "100"),
    ({"block_size": 32}, "block_size", "32"),
    ({"block_size": 0}, "block_size", "0"),
    ({"block_size": 128.0}, "block_size", "128.0"),
    ({"block_size": True}, "block_size", "True"),
    ({"sink_blocks": -1}, "sink_blocks", "-1"),
    ({"local_blocks": -3}, "local_blocks", "-3"),
    ({"pattern": "hybrid", "stride": 0}, "stride", "0"),
    ({"stride": [8]}, "stride", "[8]"),
    ({"threshold": 1.5}, "threshold", "1.5"),
    ({"threshold": -0.1}, "threshold", "-0.1"),
    ({"threshold": "high"}, "threshold", "'high'"),
    ({"threshold": False}, "threshold", "False"),
    ({"above_mean": -1}, "above_mean", "-1"),
    ({"above_mean": "Infinity"}, "above_mean", "inf"),
    ({"above_mean": "NaN"}, "above_mean", "nan"),
    ({"above_mean": [2]}, "above_mean", "[2]"),
    ({"min_budget": -1}, "min_budget", "-1"),
    ({"min_budget": 8, "max_budget": 4}, "max_budget", "4"),
    ({"min_seq_len": -1}, "min_seq_len", "-1"),
    ({"dense_tail_blocks": -2}, "dense_tail_blocks", "-2"),
    ({"dense_layers": [-1]}, "dense_layers", "-1"),
    ({"dense_layers": -2}, "dense_layers", "-2"),
    ({"dense_layers": ["a"]}, "dense_layers", "'a'"),
    ({"dense_layers": [1.5]}, "dense_layers", "1.5"),
    ({"dense_layers": "first"}, "dense_layers", "'first'"),
    ({"sparse_kernel": "fa3"}, "sparse_kernel", "'fa3'"),
    ({"sparse_kernel": 3}, "sparse_kernel", "3"),
    # Too large to be a position or block count (vLLM's sequence lengths are int32), or a tile.
    ({"block_size": 2**40}, "block_size", "1099511627776"),
    ({"block_size": 8192}, "block_size", "8192"),
    ({"min_budget": 10**20}, "min_budget", "100000000000000000000"),
    ({"max_budget": 2**31}, "max_budget", "2147483648"),
    ({"min_seq_len": 2**31}, "min_seq_len", "2147483648"),
    ({"sink_blocks": 2**40}, "sink_blocks", "1099511627776"),
    ({"local_blocks": 2**40}, "local_blocks", "1099511627776"),
    ({"stride": 2**40}, "stride", "1099511627776"),
    ({"dense_tail_blocks": 2**40}, "dense_tail_blocks", "1099511627776"),
    ({"dense_layers": 2**40}, "dense_layers", "1099511627776"),
    ({"dense_layers": [0, 2**40]}, "dense_layers", "1099511627776"),
    # Containers and NumPy values that are not the option's type.
    ({"dense_layers": {1, 2}}, "dense_layers", "{1, 2}"),
    ({"dense_layers": [np.float64(1.0)]}, "dense_layers", "1.0"),
    ({"block_size": np.bool_(True)}, "block_size", "True"),
    ({"threshold": np.bool_(False)}, "threshold", "False"),
    ({"block_size": np.float32(128)}, "block_size", "128.0"),
]


@pytest.mark.parametrize(
    "options, key, shown",
    BAD_CONFIGS,
    ids=[f"{key}={shown}" + ("+" if len(opts) > 1 else "") for opts, key, shown in BAD_CONFIGS],
)
def test_bad_config_is_rejected_by_name(options, key, shown):
    with pytest.raises(ValueError) as excinfo:
        load(options)
    message = str(excinfo.value)
    assert f"'{key}'" in message, message
    assert shown in message, message
    assert message.startswith("flashprefill:"), message


def test_numpy_numbers_are_numbers():
    cfg = load({
        "block_size": np.int64(256), "sink_blocks": np.uint8(2), "threshold": np.float32(0.25),
        "above_mean": np.int32(3), "dense_layers": [np.int64(0), np.int16(3)], "min_seq_len": np.int64(0),
    })
    assert cfg == FlashPrefillConfig(
        sparse_block=256, sink_blocks=2, threshold=0.25, above_mean=3.0, dense_layers=(0, 3), min_seq_len=0
    )
    # Plain Python values inside: the config hashes, compares and prints like one from JSON.
    assert type(cfg.sparse_block) is int and type(cfg.threshold) is float
    assert all(type(i) is int for i in cfg.dense_layers)
    dense_layers = load({"dense_layers": np.int64(2)}).dense_layers
    assert dense_layers == 2 and type(dense_layers) is int


def test_largest_values_pass():
    cfg = load({"block_size": 4096, "min_seq_len": 2**31 - 1, "sink_blocks": 2**31 - 1, "max_budget": 2**31 - 1})
    assert (cfg.sparse_block, cfg.min_seq_len, cfg.max_budget) == (4096, 2**31 - 1, 2**31 - 1)


@pytest.mark.parametrize("key", [1, None, ("pattern",)], ids=repr)
def test_non_string_option_names_are_rejected_by_name(key):
    with pytest.raises(ValueError) as excinfo:
        load({key: "hybrid"})
    assert str(excinfo.value).startswith(f"flashprefill: unknown key {key!r} (value 'hybrid')")


@pytest.mark.parametrize(
    "pattern, stride, allowed",
    [
        ("dynamic", -1, "allowed: an integer in [0, 2147483647] (0: no strided blocks)"),
        ("local", -1, "allowed: an integer in [0, 2147483647] (0: no strided blocks)"),
        ("hybrid", 0, "allowed: an integer in [1, 2147483647] for pattern 'hybrid' (0 is allowed for "
                      "dynamic and local only)"),
        ("strided", -2, "allowed: an integer in [1, 2147483647] for pattern 'strided' (0 is allowed for "
                        "dynamic and local only)"),
    ],
)
def test_stride_message_says_what_the_pattern_allows(pattern, stride, allowed):
    with pytest.raises(ValueError) as excinfo:
        load({"pattern": pattern, "stride": stride})
    assert str(excinfo.value) == f"flashprefill: invalid value for 'stride': {stride}; {allowed}"


@pytest.mark.parametrize("section", ["hybrid", ["pattern", "hybrid"], 3, None], ids=repr)
def test_section_must_be_a_dict(section):
    with pytest.raises(ValueError) as excinfo:
        FlashPrefillConfig.from_additional_config({"flashprefill": section}, environ={})
    message = str(excinfo.value)
    assert "'flashprefill'" in message, message
    assert repr(section) in message, message
    assert "dict" in message, message


# --- options that would be ignored: at the top level or under a misspelt section -----------------

MISPLACED = [
    ({"pattern": "hybrid"}, "'pattern'"),
    ({"flashprefill": {"stride": 8}, "block_size": 256}, "'block_size'"),
    ({"flashprefill.pattern": "hybrid"}, "'flashprefill.pattern'"),
    ({"flashprefil": {"pattern": "hybrid"}}, "'flashprefil'"),
    ({"flash_prefill": {"pattern": "hybrid"}}, "'flash_prefill'"),
    ({"FlashPrefill": {"pattern": "hybrid"}}, "'FlashPrefill'"),
    ({"FLASHPREFILL": {"pattern": "hybrid"}}, "'FLASHPREFILL'"),
    ({"flash-prefill": {}}, "'flash-prefill'"),
    ({"flashprefill_config": {"pattern": "hybrid"}}, "'flashprefill_config'"),
]


@pytest.mark.parametrize("additional_config, key", MISPLACED, ids=[k for _, k in MISPLACED])
def test_misplaced_options_are_rejected_with_where_they_belong(additional_config, key):
    with pytest.raises(ValueError) as excinfo:
        FlashPrefillConfig.from_additional_config(additional_config, environ={})
    message = str(excinfo.value)
    assert message.startswith("flashprefill:"), message
    assert key in message, message
    assert "additional_config['flashprefill']" in message or '{"flashprefill": {' in message, message


def test_misplaced_option_messages():
    def message(additional_config):
        with pytest.raises(ValueError) as excinfo:
            FlashPrefillConfig.from_additional_config(additional_config, environ={})
        return str(excinfo.value)

    assert message({"pattern": "hybrid"}) == (
        "flashprefill: option 'pattern' (value 'hybrid') is at the top level of additional_config, "
        "where it is not read; FlashPrefill options belong under additional_config['flashprefill']: "
        '{"flashprefill": {"pattern": "hybrid"}}'
    )
    assert message({"flashprefill.dense_layers": [0, 1]}) == (
        "flashprefill: additional_config key 'flashprefill.dense_layers' (value [0, 1]) is not read "
        "(a JSON key is not split at its dots); write {\"flashprefill\": {\"dense_layers\": [0, 1]}}, "
        "or on the command line --additional-config.flashprefill.dense_layers=..."
    )
    assert message({"flashprefil": {"pattern": "hybrid"}}) == (
        "flashprefill: additional_config section 'flashprefil' is not read (did you mean 'flashprefill'?); "
        "FlashPrefill options belong under additional_config['flashprefill']"
    )


def test_other_keys_that_look_alike_are_not_ours():
    """vLLM's own top-level keys and other plugins' sections stay unchecked."""
    additional_config = {
        "gdn_prefill_backend": "triton", "kda_prefill_backend": "x", "prefill": {}, "flashinfer": {},
        "flash_attn": {}, "flashprefill": {"pattern": "local"},
    }
    assert load({"pattern": "local"}) == FlashPrefillConfig.from_additional_config(additional_config, environ={})


# --- FLASHPREFILL_* environment overrides --------------------------------------------------------

ENV_OVERRIDES = {
    "FLASHPREFILL_PATTERN": "local",
    "FLASHPREFILL_BLOCK_SIZE": "256",
    "FLASHPREFILL_DENSE_LAYERS": "[0,1]",
    "FLASHPREFILL_THRESHOLD": "0.2",
}
FROM_FILE = {"pattern": "hybrid", "block_size": 128, "dense_layers": 4, "threshold": 0.5, "stride": 8}


def test_env_overrides_additional_config():
    cfg = load(FROM_FILE, environ=ENV_OVERRIDES)
    assert cfg.pattern == "local"
    assert cfg.sparse_block == 256
    assert cfg.dense_layers == (0, 1)
    assert cfg.threshold == pytest.approx(0.2)
    assert cfg.stride == 8  # not overridden: the additional_config value stays


@pytest.mark.parametrize(
    "name, value, key, expected",
    [
        ("FLASHPREFILL_PATTERN", "local", "pattern", "local"),
        ("FLASHPREFILL_PATTERN", "Strided", "pattern", "strided"),
        ("FLASHPREFILL_BLOCK_SIZE", "256", "sparse_block", 256),
        ("FLASHPREFILL_DENSE_LAYERS", "[0,1]", "dense_layers", (0, 1)),
        ("FLASHPREFILL_DENSE_LAYERS", "2", "dense_layers", 2),
        ("FLASHPREFILL_THRESHOLD", "0.2", "threshold", 0.2),
        ("FLASHPREFILL_STRIDE", "32", "stride", 32),
        ("FLASHPREFILL_SPARSE_KERNEL", "flash_attn", "sparse_kernel", "flash_attn"),
    ],
)
def test_each_env_override_alone(name, value, key, expected):
    cfg = load(FROM_FILE, environ={name: value})
    assert cfg == dataclasses.replace(load(FROM_FILE), **{key: expected})


def test_env_overrides_without_additional_config():
    cfg = FlashPrefillConfig.from_additional_config(None, environ={"FLASHPREFILL_DENSE_LAYERS": "3"})
    assert cfg.dense_layers == 3
    assert cfg.layer_is_dense(2) and not cfg.layer_is_dense(3)


def test_explicit_environ_ignores_process_environment(monkeypatch):
    monkeypatch.setenv("FLASHPREFILL_BLOCK_SIZE", "not-a-number")
    monkeypatch.setenv("FLASHPREFILL_PATTERN", "dense")
    assert load({"pattern": "strided"}, environ={}).pattern == "strided"
    with pytest.raises(ValueError, match="block_size"):
        FlashPrefillConfig.from_additional_config({"flashprefill": {}})  # environ=None: os.environ


def test_from_vllm_config_reads_process_environment(monkeypatch):
    vllm_config = types.SimpleNamespace(
        additional_config={"flashprefill": {"pattern": "hybrid", "block_size": 128, "stride": 4}}
    )
    assert FlashPrefillConfig.from_vllm_config(vllm_config).pattern == "hybrid"
    for name, value in ENV_OVERRIDES.items():
        monkeypatch.setenv(name, value)
    cfg = FlashPrefillConfig.from_vllm_config(vllm_config)
    assert (cfg.pattern, cfg.sparse_block, cfg.dense_layers) == ("local", 256, (0, 1))
    assert cfg.threshold == pytest.approx(0.2)
    assert cfg.stride == 4


def test_from_vllm_config_without_additional_config(monkeypatch):
    assert FlashPrefillConfig.from_vllm_config(types.SimpleNamespace()) == FlashPrefillConfig()
    monkeypatch.setenv("FLASHPREFILL_PATTERN", "strided")
    assert FlashPrefillConfig.from_vllm_config(object()).pattern == "strided"


@pytest.mark.parametrize(
    "name, value, key, shown",
    [
        ("FLASHPREFILL_BLOCK_SIZE", "big", "block_size", "'big'"),
        ("FLASHPREFILL_BLOCK_SIZE", "96", "block_size", "96"),
        ("FLASHPREFILL_PATTERN", "everything", "pattern", "'everything'"),
        ("FLASHPREFILL_THRESHOLD", "2", "threshold", "2"),
        ("FLASHPREFILL_THRESHOLD", "NaN", "threshold", "nan"),
        ("FLASHPREFILL_DENSE_LAYERS", "[0,-1]", "dense_layers", "-1"),
        ("FLASHPREFILL_DENSE_LAYERS", "[0,", "dense_layers", "'[0,'"),
        ("FLASHPREFILL_STRIDE", "0", "stride", "0"),
    ],
)
def test_bad_env_value_is_rejected_by_name(name, value, key, shown):
    with pytest.raises(ValueError) as excinfo:
        load({"pattern": "hybrid"}, environ={name: value})
    message = str(excinfo.value)
    assert f"'{key}'" in message, message
    assert shown in message, message


def test_env_other_prefixes_are_not_options():
    environ = {"VLLM_ATTENTION_BACKEND": "FLASH_ATTN", "FLASHPREFILLX": "1", "flashprefill_pattern": "x"}
    assert load({}, environ=environ) == FlashPrefillConfig()
    assert load({"stride": 4}, environ={**environ, "FLASHPREFILL_STRIDE": "2"}).stride == 2


def test_misspelt_env_option_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown key 'bloksize'.*'96'"):
        load({}, environ={"FLASHPREFILL_BLOKSIZE": "96"})


# --- dense layers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dense_layers, dense, sparse",
    [
        (0, [], [0, 1, 31]),
        (2, [0, 1], [2, 3, 31]),
        ([], [], [0, 1]),
        ([0, 5], [0, 5], [1, 4, 6]),
        ([3], [3], [0, 1, 2, 4]),
    ],
    ids=["int-0", "int-2", "list-empty", "list-0-5", "list-3"],
)
def test_layer_is_dense(dense_layers, dense, sparse):
    cfg = load({"pattern": "hybrid", "dense_layers": dense_layers})
    assert [i for i in dense if not cfg.layer_is_dense(i)] == []
    assert [i for i in sparse if cfg.layer_is_dense(i)] == []
    assert not cfg.layer_is_dense(None)  # a layer without an index follows the pattern


def test_listed_dense_layers_must_be_layers_of_the_model():
    load({"dense_layers": [0, 31]}).check_layer_count(32)
    load({"dense_layers": 40}).check_layer_count(32)  # the first 40 layers: all of them
    load({"dense_layers": []}).check_layer_count(1)
    with pytest.raises(ValueError) as excinfo:
        load({"dense_layers": [0, 32]}).check_layer_count(32)
    assert str(excinfo.value) == (
        "flashprefill: invalid value for 'dense_layers': [0, 32]; allowed: indices of the model's 32 layers "
        "(0 to 31)"
    )


def test_dense_pattern_makes_every_layer_dense():
    cfg = load({"pattern": "dense", "dense_layers": [1]})
    assert cfg.is_dense
    assert all(cfg.layer_is_dense(i) for i in (0, 1, 2, 100, None))
    assert not load({"pattern": "dynamic"}).is_dense


def test_dense_layers_list_given_directly_is_checked():
    assert FlashPrefillConfig(dense_layers=[1, 2]).dense_layers == (1, 2)
    with pytest.raises(ValueError, match="dense_layers"):
        FlashPrefillConfig(dense_layers=[-1])


def test_stride_zero_turns_strided_blocks_off_where_they_are_optional():
    assert load({"pattern": "dynamic", "stride": 0}).stride == 0
    assert load({"pattern": "local", "stride": 0}).stride == 0
    with pytest.raises(ValueError, match="stride"):
        load({"pattern": "strided", "stride": 0})


def test_ttft_benchmark_rejects_bad_options_before_starting_engines(tmp_path, capsys, monkeypatch):
    """A typo in a --configs entry stops benchmarks/engine/ttft.py at argument parsing, with the config
    error, instead of after the baseline's engines have run."""
    from benchmarks.engine import ttft

    (tmp_path / "config.json").write_text("{}")
    for spec in ('FLASHPREFILL:hybrid:{"dense_layers":0}', 'FLASHPREFILL:{"stride": -1}'):
        with pytest.raises(SystemExit) as exit_info:
            ttft.main(["--model-dir", str(tmp_path), "--configs", "FLASH_ATTN", spec])
        assert exit_info.value.code == 2
        assert "flashprefill: invalid value" in capsys.readouterr().err
    assert ttft.parse_config('FLASHPREFILL:{"pattern":"hybrid","dense_layers":0}')["pattern"] == "hybrid"


def test_serve_benchmark_rejects_bad_options_and_labels_the_pattern_the_engine_runs(
    tmp_path, capsys, monkeypatch
):
    """benchmarks/engine/serve_bench.py stops at argument parsing on a bad option, and names a run by
    the pattern the server resolves (an env override wins over --pattern, as in the engine)."""
    from benchmarks.engine import serve_bench
    from benchmarks.harness import provenance

    with pytest.raises(SystemExit) as exit_info:
        serve_bench.main(["--model-dir", str(tmp_path), "--fp-options", '{"stride": -1}', "--dry-run"])
    assert exit_info.value.code == 2
    assert "flashprefill: invalid value" in capsys.readouterr().err

    assert provenance.resolved_settings(None) is None
    assert provenance.resolved_settings({"pattern": "hybrid"})["pattern"] == "hybrid"
    monkeypatch.setenv("FLASHPREFILL_PATTERN", "local")
    resolved = provenance.resolved_settings({"pattern": "hybrid"})
    assert resolved["pattern"] == "local" and resolved["block_size"] == 128
