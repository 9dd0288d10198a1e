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
    import vllm_flashprefill
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

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
