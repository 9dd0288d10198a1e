"""FLASHPREFILL as a vLLM attention backend name, checked against the installed vLLM (no mocks):
entry-point discovery, idempotent registration, pickling into ``spawn`` children, and vLLM's own
CLI parser and engine-config construction."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

from tests._spawn_child import Holder, receive_and_report
from vllm_flashprefill.config import FlashPrefillConfig

# Literal values on purpose: these are the names users and vLLM see, so a test must notice a change.
NAME = "FLASHPREFILL"
PATH = "vllm_flashprefill.backend.FlashPrefillBackend"
ENTRY_POINT = "vllm_flashprefill.registration:register"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("clean_flashprefill_env")


@pytest.fixture
def backend_enum():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import vllm_flashprefill

    vllm_flashprefill.register()
    return AttentionBackendEnum


# --- entry point ----------------------------------------------------------------------------------


def _flashprefill_entry_points():
    from importlib.metadata import entry_points

    return [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "flashprefill"]


def test_entry_point_is_discovered():
    import vllm_flashprefill

    eps = _flashprefill_entry_points()
    assert len(eps) == 1, f"expected one 'flashprefill' general plugin, found {eps}"
    assert eps[0].value == ENTRY_POINT
    assert eps[0].load() is vllm_flashprefill.register


def _run_fresh_python(code: str, env_updates: dict[str, str | None]) -> dict:
    env = dict(os.environ)
    for key, value in env_updates.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"child failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_load_general_plugins_registers_backend():
    """A fresh interpreter knows no FLASHPREFILL until vLLM loads its general plugins.
    (``VLLM_PLUGINS``, when a user sets it, filters by the entry-point name checked above.)"""
    result = _run_fresh_python(
        """
        import json, sys
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        before = "FLASHPREFILL" in AttentionBackendEnum.__members__
        imported_early = "vllm_flashprefill" in sys.modules
        import vllm.plugins
        vllm.plugins.load_general_plugins()
        member = AttentionBackendEnum["FLASHPREFILL"]
        print(json.dumps({
            "before": before,
            "imported_early": imported_early,
            "name": member.name,
            "path": member.get_path(),
            "overridden": member.is_overridden(),
        }))
        """,
        {"VLLM_PLUGINS": None},
    )
    assert result == {
        "before": False,
        "imported_early": False,
        "name": NAME,
        "path": PATH,
        "overridden": True,
    }


# --- registration ---------------------------------------------------------------------------------


def test_register_twice_is_harmless(backend_enum):
    import vllm_flashprefill

    first = backend_enum[NAME]
    n_members = len(backend_enum.__members__)
    vllm_flashprefill.register()
    vllm_flashprefill.register()
    assert backend_enum[NAME] is first
    assert len(backend_enum.__members__) == n_members
    assert backend_enum._member_names_.count(NAME) == 1
    assert first.name == NAME
    assert first.get_path() == PATH
    assert backend_enum(PATH) is first  # lookup by value finds the same member
    assert getattr(backend_enum, NAME) is first


def test_register_restores_a_cleared_override(backend_enum):
    import vllm_flashprefill

    member = backend_enum[NAME]
    member.clear_override()
    vllm_flashprefill.register()
    assert member.is_overridden()
    assert member.get_path() == PATH


def test_unknown_name_still_rejected_by_vllm(backend_enum):
    with pytest.raises(ValueError, match="Unknown attention backend: 'NOPE'"):
        backend_enum["NOPE"]


def test_member_pickles_to_itself_in_process(backend_enum):
    member = backend_enum[NAME]
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(member, protocol=protocol)) is member
    assert copy.deepcopy(member) is member
    assert copy.copy(member) is member
    # Built-in members keep vLLM's own pickling.
    assert pickle.loads(pickle.dumps(backend_enum.TRITON_ATTN)) is backend_enum.TRITON_ATTN


def _round_trip_through_spawn(messages: list[tuple[str, object]]) -> dict:
    """Send (kind, object) pairs to a fresh ``spawn`` child and return its report."""
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=receive_and_report, args=(child_conn,), daemon=True)
    proc.start()
    child_conn.close()
    try:
        for kind, obj in messages:
            parent_conn.send(kind)
            parent_conn.send(obj)
        parent_conn.send("done")
        assert parent_conn.poll(300), "spawned child sent no report within 300 s"
        report = parent_conn.recv()
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert report["ok"], report.get("error")
    assert proc.exitcode == 0
    return report


def test_member_round_trips_through_spawn_child(backend_enum):
    from vllm.config import AttentionConfig

    member = backend_enum[NAME]
    report = _round_trip_through_spawn(
        [
            ("holder", Holder(member, label="first contact, nested")),
            ("dict", {"backends": [member, member]}),
            ("member", member),
            ("attention_config", AttentionConfig(backend=member)),
        ]
    )
    # The child met FLASHPREFILL only while unpickling: nothing had imported the plugin or loaded
    # vLLM's general plugins before.
    assert report["before"] == {"flashprefill_imported": False, "general_plugins_loaded": False}
    assert [r["kind"] for r in report["received"]] == ["holder", "dict", "member", "attention_config"]
    for r in report["received"]:
        assert r["type"] == "vllm.v1.attention.backends.registry.AttentionBackendEnum"
        assert r["name"] == NAME
        assert r["path"] == PATH
        assert r["is_registered_member"]
    assert report["received"][0]["label"] == "first contact, nested"
    assert report["received"][1]["same_object_twice"]
    assert report["after"]["flashprefill_imported"]


# --- vLLM's CLI and engine config -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A Llama config without weights or tokenizer: enough for vLLM to build a VllmConfig."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def engine_parser():
    """``EngineArgs``'s parser, as offline scripts and ``vllm bench`` build it."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return EngineArgs.add_cli_args(FlexibleArgumentParser(prog="flashprefill-test"))


def _engine_config(parser, model: str, argv: list[str], args_cls=None):
    from vllm.engine.arg_utils import EngineArgs

    args_cls = args_cls or EngineArgs
    args = parser.parse_args(["--model", model, "--skip-tokenizer-init", *argv])
    return args, args_cls.from_cli_args(args).create_engine_config()


@pytest.mark.parametrize("spelling", ["FLASHPREFILL", "flashprefill"])
def test_cli_json_additional_config(engine_parser, tiny_llama, spelling):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    options = {"flashprefill": {"pattern": "hybrid", "stride": 8}}
    args, vllm_config = _engine_config(
        engine_parser,
        tiny_llama,
        ["--attention-backend", spelling, "--additional-config", json.dumps(options)],
    )
    # At parse time the name is a plain string (no argparse choices); vLLM resolves it later.
    assert args.attention_backend == spelling
    assert args.additional_config == options
    assert vllm_config.attention_config.backend is AttentionBackendEnum.FLASHPREFILL
    cfg = FlashPrefillConfig.from_vllm_config(vllm_config)
    assert (cfg.pattern, cfg.stride) == ("hybrid", 8)
    assert cfg.sparse_block == FlashPrefillConfig().sparse_block


@pytest.mark.parametrize(
    "argv, stride",
    [
        (["--additional-config.flashprefill.pattern=hybrid"], FlashPrefillConfig().stride),
        (
            [
                "--additional-config.flashprefill.pattern",
                "hybrid",
                "--additional-config.flashprefill.stride=8",
            ],
            8,
        ),
    ],
    ids=["equals", "space-and-int"],
)
def test_cli_dotted_additional_config(engine_parser, tiny_llama, argv, stride):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    _, vllm_config = _engine_config(
        engine_parser, tiny_llama, ["--attention-backend", "FLASHPREFILL", *argv]
    )
    assert vllm_config.attention_config.backend is AttentionBackendEnum.FLASHPREFILL
    cfg = FlashPrefillConfig.from_vllm_config(vllm_config)
    assert (cfg.pattern, cfg.stride) == ("hybrid", stride)


def test_cli_unknown_backend_is_rejected(engine_parser, tiny_llama, backend_enum):
    args = engine_parser.parse_args(
        ["--model", tiny_llama, "--skip-tokenizer-init", "--attention-backend", "NOPE"]
    )
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="Unknown attention backend: 'NOPE'") as excinfo:
        EngineArgs.from_cli_args(args).create_engine_config()
    assert NAME in str(excinfo.value)  # listed among the valid options


def test_cli_env_overrides_reach_from_vllm_config(engine_parser, tiny_llama, monkeypatch):
    _, vllm_config = _engine_config(
        engine_parser,
        tiny_llama,
        [
            "--attention-backend",
            "FLASHPREFILL",
            "--additional-config",
            '{"flashprefill": {"pattern": "hybrid", "block_size": 128}}',
        ],
    )
    monkeypatch.setenv("FLASHPREFILL_PATTERN", "local")
    monkeypatch.setenv("FLASHPREFILL_BLOCK_SIZE", "256")
    cfg = FlashPrefillConfig.from_vllm_config(vllm_config)
    assert (cfg.pattern, cfg.sparse_block) == ("local", 256)


def test_serve_parser_accepts_backend_per_kind_and_config_survives_spawn(tiny_llama):
    """``vllm serve`` builds its parser with ``AsyncEngineArgs.add_cli_args``, which loads the
    general plugins first: ``-ac`` is validated while parsing, so FLASHPREFILL must exist by then.
    The resulting ``VllmConfig`` then goes to a spawned child, as it does to an engine core."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="flashprefill-test"))
    options = {"flashprefill": {"pattern": "dynamic", "threshold": 0.25}}
    _, vllm_config = _engine_config(
        parser,
        tiny_llama,
        [
            "-ac",
            '{"backend_per_kind": {"full_attention": "FLASHPREFILL"}}',
            "--additional-config",
            json.dumps(options),
        ],
        args_cls=AsyncEngineArgs,
    )
    attn = vllm_config.attention_config
    assert attn.backend is None
    assert attn.backend_per_kind["full_attention"] is AttentionBackendEnum.FLASHPREFILL

    report = _round_trip_through_spawn([("vllm_config", vllm_config)])
    assert report["before"]["flashprefill_imported"] is False
    (received,) = report["received"]
    assert (received["name"], received["path"]) == (NAME, PATH)
    assert received["is_registered_member"]
    assert received["additional_config"]["flashprefill"] == options["flashprefill"]


# --- options checked where the engine config is built (before any model loads) ----------------

BOGUS = {"flashprefill": {"pattern": "bogus"}}
BOGUS_MESSAGE = (
    "flashprefill: invalid value for 'pattern': 'bogus'; allowed: dense | local | strided | hybrid | dynamic"
)


def _vllm_log_records():
    """Records of vLLM's loggers (vLLM's logging config does not propagate them to the root)."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    return records, handler


def test_bad_options_stop_create_engine_config(tiny_llama):
    """``EngineArgs.create_engine_config`` (what ``LLM()`` and ``vllm serve`` call before starting
    an engine) raises the option error itself, on any platform."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=tiny_llama, skip_tokenizer_init=True, attention_backend="FLASHPREFILL", additional_config=BOGUS
    )
    with pytest.raises(ValueError) as excinfo:
        args.create_engine_config()
    assert str(excinfo.value) == BOGUS_MESSAGE


def test_bad_options_stop_llm_before_an_engine_starts(tiny_llama, monkeypatch):
    import vllm
    from vllm.v1.engine.core_client import EngineCoreClient

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(EngineCoreClient, "make_client", no_engine)
    with pytest.raises(ValueError, match="'pattern': 'bogus'"):
        vllm.LLM(tiny_llama, skip_tokenizer_init=True, attention_backend="FLASHPREFILL", additional_config=BOGUS)


def test_bad_options_stop_cli_engine_config(engine_parser, tiny_llama):
    argv = ["--attention-backend", "FLASHPREFILL", "--additional-config", json.dumps(BOGUS)]
    with pytest.raises(ValueError, match="'pattern': 'bogus'"):
        _engine_config(engine_parser, tiny_llama, argv)
    with pytest.raises(ValueError, match="'stride': -1"):
        _engine_config(
            engine_parser, tiny_llama,
            ["--attention-backend", "FLASHPREFILL", "--additional-config.flashprefill.stride=-1"],
        )


def test_bad_env_option_stops_engine_config_with_backend_per_kind(tiny_llama, monkeypatch):
    """FLASHPREFILL selected for one kind of layer, no section: the env overrides are checked."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="flashprefill-test"))
    monkeypatch.setenv("FLASHPREFILL_BLOCK_SIZE", "100")
    with pytest.raises(ValueError, match="'block_size': 100"):
        _engine_config(
            parser, tiny_llama, ["-ac", '{"backend_per_kind": {"full_attention": "FLASHPREFILL"}}'],
            args_cls=AsyncEngineArgs,
        )


def test_section_without_the_backend_is_checked_and_warned_about(tiny_llama):
    import logging

    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="'pattern': 'bogus'"):
        EngineArgs(model=tiny_llama, skip_tokenizer_init=True, additional_config=BOGUS).create_engine_config()

    records, handler = _vllm_log_records()
    logger = logging.getLogger("vllm.flashprefill")
    logger.addHandler(handler)
    try:
        EngineArgs(
            model=tiny_llama, skip_tokenizer_init=True, additional_config={"flashprefill": {"pattern": "hybrid"}}
        ).create_engine_config()
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "FlashPrefill: additional_config has a 'flashprefill' section but the attention backend is not "
        "FLASHPREFILL; its options have no effect"
    ]


def test_without_the_backend_or_a_section_nothing_is_checked(tiny_llama, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv("FLASHPREFILL_PATTERN", "bogus")  # read only by an engine that runs FLASHPREFILL
    vllm_config = EngineArgs(
        model=tiny_llama, skip_tokenizer_init=True, additional_config={"pattern": "not ours"}
    ).create_engine_config()
    assert vllm_config.additional_config == {"pattern": "not ours"}


def test_register_wraps_create_engine_config_once(backend_enum):
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    import vllm_flashprefill

    wrapped = EngineArgs.create_engine_config
    vllm_flashprefill.register()
    assert EngineArgs.create_engine_config is wrapped
    assert AsyncEngineArgs.create_engine_config is wrapped  # inherited, not overridden
    assert wrapped.__wrapped__.__qualname__ == "EngineArgs.create_engine_config"


def test_api_server_with_bad_options_exits_before_an_engine_starts(tiny_llama):
    """The issue's case: a server started with a bad pattern (here on the CPU platform) stops in
    its API server process with the option error; no engine core process starts."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_llama,
            "--skip-tokenizer-init", "--attention-backend", "FLASHPREFILL",
            "--additional-config", json.dumps(BOGUS),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stderr.rstrip().splitlines()[-1] == f"ValueError: {BOGUS_MESSAGE}"
    assert "EngineCore" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "backend, additional_config, shown",
    [
        ("FLASHPREFILL", {"pattern": "hybrid"}, "option 'pattern' (value 'hybrid') is at the top level"),
        ("FLASHPREFILL", {"flash_prefill": {"pattern": "hybrid"}}, "section 'flash_prefill' is not read"),
        (None, {"flashprefil": {"pattern": "hybrid"}}, "section 'flashprefil' is not read"),
        (None, {"flashprefill.pattern": "hybrid"}, "key 'flashprefill.pattern' (value 'hybrid') is not read"),
    ],
    ids=["top-level", "misspelt", "misspelt-no-backend", "dotted-no-backend"],
)
def test_misplaced_options_stop_engine_config(tiny_llama, backend, additional_config, shown):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=tiny_llama, skip_tokenizer_init=True, attention_backend=backend, additional_config=additional_config
    )
    with pytest.raises(ValueError) as excinfo:
        args.create_engine_config()
    assert shown in str(excinfo.value)


def test_dense_layers_past_the_models_layers_stop_engine_config(tiny_llama):
    from vllm.engine.arg_utils import EngineArgs

    def engine_config(dense_layers):
        return EngineArgs(
            model=tiny_llama, skip_tokenizer_init=True, attention_backend="FLASHPREFILL",
            additional_config={"flashprefill": {"dense_layers": dense_layers}},
        ).create_engine_config()

    engine_config([0, 1])
    engine_config(4)  # the default on a 2-layer model: every layer
    with pytest.raises(ValueError, match=r"'dense_layers': \[1, 2\]; allowed: indices of the model's 2 layers"):
        engine_config([1, 2])


def test_numpy_options_are_accepted_and_the_engine_config_still_hashes(tiny_llama):
    """vLLM hashes additional_config as JSON (VllmConfig.compute_hash, in every engine), which
    fails on NumPy values: the checked section is stored back in plain JSON types."""
    import numpy as np
    from vllm.engine.arg_utils import EngineArgs

    section = {"block_size": np.int64(256), "threshold": np.float32(0.25), "dense_layers": [np.int64(1)],
               "pattern": "Hybrid"}
    vllm_config = EngineArgs(
        model=tiny_llama, skip_tokenizer_init=True, attention_backend="FLASHPREFILL",
        additional_config={"flashprefill": section},
    ).create_engine_config()
    vllm_config.compute_hash()
    assert vllm_config.additional_config["flashprefill"] == {
        "block_size": 256, "threshold": 0.25, "dense_layers": [1], "pattern": "hybrid"
    }
    cfg = FlashPrefillConfig.from_vllm_config(vllm_config)
    assert (cfg.sparse_block, cfg.threshold, cfg.dense_layers, cfg.pattern) == (256, 0.25, (1,), "hybrid")
