"""The serving layer around the engine: ServeConfig validation and TOML, the committed gRPC stubs, the bearer
token and TLS (on a colocated one-device engine: no step runs, nothing compiles), and `msjax serve` itself."""

import os
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

import msjax
from msjax import ConfigError, DeploymentPlan
from serving.config import DISAGGREGATED_DEMO_PLAN, ServeConfig
from serving.proto.msjax.v1 import decode_pb2, decode_pb2_grpc
from tests.serving_utils import http, poll

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("field,kwargs", [
    ("model", dict(model="")),
    ("grpc_port", dict(grpc_port=70000)),
    ("http_port", dict(http_port=-5)),
    ("max_concurrent_requests", dict(max_concurrent_requests=0)),
    ("max_queue", dict(max_queue=-1)),
    ("max_prompt_tokens", dict(max_prompt_tokens=0)),
    ("max_tokens_cap", dict(max_tokens_cap="many")),
    ("tls_key", dict(tls_cert=__file__)),
    ("tls_cert", dict(tls_cert="/nonexistent.pem", tls_key=__file__)),
    ("api_token", dict(api_token="")),
    ("warmup", dict(warmup="yes")),
    ("plan", dict(plan="default")),  # the demo's old name: the error says what to use instead
    ("engine.max_num_sequences", dict(engine={"max_num_sequences": 4})),
    ("max_num_seqs", dict(engine={"max_num_seqs": 0})),
])
def test_serve_config_errors_name_the_field(field, kwargs):
    with pytest.raises(ConfigError) as err:
        ServeConfig(**kwargs)
    assert err.value.field == field


def test_serve_config_defaults_and_toml(tmp_path):
    config = msjax.ServeConfig()
    assert (config.model, config.host, config.plan) == ("tiny-moe", "127.0.0.1", "auto")
    assert config.resolved_plan() is None and not config.needs_host_devices  # CPU only here: colocated
    demo = ServeConfig(plan="disaggregated")
    assert demo.resolved_plan() == DISAGGREGATED_DEMO_PLAN and demo.needs_host_devices
    assert DISAGGREGATED_DEMO_PLAN.num_devices == 8 and not DISAGGREGATED_DEMO_PLAN.is_colocated
    assert config.api_token is None and config.tls_cert is None  # security is opt-in
    assert config.warmup is True  # the first request is as fast as the tenth
    text = """
[serve]
model = "tiny-moe"
grpc_port = 0
max_queue = 3

[engine]
max_num_seqs = 4

[plan]
attention_nodes = 2
expert_nodes = 2
"""
    config = ServeConfig.from_toml(text, http_port=0, host=None)
    assert (config.grpc_port, config.http_port, config.max_queue, config.host) == (0, 0, 3, "127.0.0.1")
    assert config.engine == {"max_num_seqs": 4}
    assert config.resolved_plan() == DeploymentPlan(attention_nodes=2, expert_nodes=2)
    plan_file = tmp_path / "plan.toml"
    DeploymentPlan(expert_nodes=2).save(plan_file)
    assert ServeConfig.from_toml(f'plan = "{plan_file}"').resolved_plan() == DeploymentPlan(expert_nodes=2)
    assert ServeConfig(plan=str(plan_file)).resolved_plan() == DeploymentPlan(expert_nodes=2)
    assert ServeConfig(plan="colocated").resolved_plan() is None
    with pytest.raises(ConfigError) as err:
        ServeConfig.from_toml("grpc_prot = 5")
    assert err.value.field == "grpc_prot"
    with pytest.raises(ConfigError) as err:
        ServeConfig(plan=str(tmp_path / "missing.toml")).resolved_plan()
    assert err.value.field == "plan"


def test_cli_parses_serve_flags():
    from msjax.cli import build_parser
    args = build_parser().parse_args(["serve", "--config", "x.toml", "--model", "m", "--plan", "p.toml", "--host",
                                      "0.0.0.0", "--grpc-port", "1", "--http-port", "2"])
    assert (args.config, args.model, args.plan, args.host, args.grpc_port, args.http_port) == \
        ("x.toml", "m", "p.toml", "0.0.0.0", 1, 2)


def test_generated_stubs_are_current(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run(["bash", str(ROOT / "tools/gen_proto.sh"), str(tmp_path)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in ("decode_pb2.py", "decode_pb2.pyi", "decode_pb2_grpc.py"):
        fresh = (tmp_path / "msjax/v1" / name).read_text()
        assert fresh == (ROOT / "serving/proto/msjax/v1" / name).read_text(), f"{name} is stale: run tools/gen_proto.sh"


# --- bearer token and TLS ---

@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    config = ServeConfig(plan="colocated", grpc_port=0, http_port=0, api_token="s3cret",
                         tls_cert=str(d / "cert.pem"), tls_key=str(d / "key.pem"), engine={"num_pages": 64},
                         warmup=False)
    with msjax.serve(config) as server:
        yield server, (d / "cert.pem").read_bytes(), str(d / "cert.pem")


def test_token_and_tls(secure_server):
    server, cert, cert_file = secure_server
    assert server.http_address.startswith("https://")
    credentials = grpc.ssl_channel_credentials(root_certificates=cert)
    with grpc.secure_channel(server.grpc_address, credentials) as channel:
        stub = decode_pb2_grpc.DecodeStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfo(decode_pb2.ModelInfoRequest(), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(decode_pb2.GenerateRequest(prompt="Flat is"), timeout=30,
                               metadata=[("authorization", "Bearer wrong")]))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = stub.ModelInfo(decode_pb2.ModelInfoRequest(), timeout=30,
                              metadata=[("authorization", "Bearer s3cret")])
        assert info.model == "tiny-moe" and info.plan == ""
    with grpc.insecure_channel(server.grpc_address) as plain:  # no TLS, no answer
        with pytest.raises(grpc.RpcError):
            decode_pb2_grpc.DecodeStub(plain).ModelInfo(decode_pb2.ModelInfoRequest(), timeout=5,
                                                        metadata=[("authorization", "Bearer s3cret")])
    context = ssl.create_default_context(cafile=cert_file)
    status, body = http("GET", server.http_address + "/v1/models", context=context)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body = http("GET", server.http_address + "/v1/models", context=context,
                        headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and body["data"][0]["id"] == "tiny-moe"
    assert http("GET", server.http_address + "/health", context=context)[0] == 200  # probes need no token


def test_stop_closes_the_engine_it_built_and_not_one_handed_in(monkeypatch):
    """A server that loaded its engine releases it on stop (a multi-process plan's node processes stop with it:
    tests/test_multiprocess.py); an engine handed to `serve` stays its caller's."""
    from msjax.engine.engine import Engine
    closed = []
    monkeypatch.setattr(Engine, "close", lambda self: closed.append(self))
    config = ServeConfig(plan="colocated", grpc_port=0, http_port=-1, engine={"num_pages": 64}, warmup=False)
    with msjax.serve(config) as server:
        built = server.engine
    assert closed == [built]
    with msjax.serve(config, engine=built):
        pass
    assert closed == [built]


# --- warm start ---

WARM_ENGINE = {"max_num_seqs": 2, "max_num_batched_tokens": 32, "num_pages": 32, "page_size": 16,
               "max_model_len": 64}


def test_warm_start_reports_loading_then_compiles_nothing_after_ready():
    """Until the warm-up has compiled every step shape, /health answers 503 "loading" and gRPC health
    NOT_SERVING, and a request sent meanwhile is accepted and served once ready; after that, requests of every
    kind (prompt lengths that prefill in one chunk or several, logprobs or not, more requests than fit in a
    step, sampled or greedy) compile nothing: the first request is as fast as the tenth."""
    import concurrent.futures

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.serving_utils import count_compiles
    from tests.test_tiny_moe import ZEN
    seen = {}
    pool = concurrent.futures.ThreadPoolExecutor(4)
    body = {"prompt": "Beautiful is better than", "max_tokens": 6, "temperature": 0}

    def listening(server):
        seen["health"] = http("GET", server.http_address + "/health")
        with grpc.insecure_channel(server.grpc_address) as channel:
            seen["grpc"] = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                     timeout=10).status
        seen["early"] = pool.submit(http, "POST", server.http_address + "/v1/completions", body, timeout=300)
        poll(lambda: server.loop.num_in_flight == 1, what="the early request to be accepted")
        seen["early_done_while_loading"] = seen["early"].done()

    phases = []
    config = ServeConfig(plan="colocated", grpc_port=0, http_port=0, engine=WARM_ENGINE)
    with msjax.serve(config, on_listening=listening, warmup_progress=lambda d, t: phases.append((d, t))) as server:
        assert seen["health"] == (503, {"status": "loading"})
        assert seen["grpc"] == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not seen["early_done_while_loading"] and phases and phases[-1][0] == phases[-1][1]
        assert http("GET", server.http_address + "/health") == (200, {"status": "ok"})
        status, early = seen["early"].result(300)
        again = http("POST", server.http_address + "/v1/completions", body)  # the same greedy request, once ready
        assert status == 200 and again[0] == 200 and early["choices"][0]["text"] == again[1]["choices"][0]["text"]
        assert early["usage"]["completion_tokens"] == 6
        zen = server.engine.tokenizer.encode(ZEN).ids
        requests = [{"prompt": zen[:n], "max_tokens": k, "temperature": t, **({"logprobs": 2} if lp else {})}
                    for n, k, t, lp in [(1, 3, 0, False), (5, 8, 0.7, True), (31, 2, 0, False), (33, 5, 0, True),
                                        (50, 9, 1.0, False), (12, 4, 0, True), (40, 3, 0, False)]]
        with count_compiles() as compiles:
            results = list(pool.map(lambda b: http("POST", server.http_address + "/v1/completions", b, timeout=300),
                                    requests))
        assert [status for status, _ in results] == [200] * len(requests), results
        assert compiles == [], f"{len(compiles)} compiles after the server reported ready"
    pool.shutdown()


# --- the command line, on its defaults (the disaggregated plan over 8 host devices) ---

@pytest.mark.slow
@pytest.mark.parametrize("plan_flag", [(), ("--plan", "disaggregated")], ids=["auto", "disaggregated"])
def test_msjax_serve_cli_plans(tmp_path, plan_flag):
    """The default plan is the planner's choice for this machine (CPU only: colocated), printed with its reason;
    the disaggregated demo is one flag away."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI sets the device count itself
    # --no-warmup: the demo plan's warm-up compiles 78 steps' programs (3.5 min on 2 cores); the warm-up itself
    # is tested in-process (test_warm_start_..., the soak) and measured by bench/serve_warm_start.py
    stderr = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "msjax", "serve", "--grpc-port", "0", "--http-port", "0",
                             "--no-warmup", "--compile-cache", str(tmp_path / "xla"), *plan_flag],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        lines = []
        poll(lambda: lines.append(proc.stdout.readline()) or "Ctrl-C" in lines[-1] or proc.poll() is not None,
             timeout=120, what="the server to start")
        banner = "".join(lines)
        assert proc.poll() is None, banner
        grpc_address = next(line.split()[1] for line in lines if line.strip().startswith("gRPC"))
        http_address = next(line.split()[1] for line in lines if line.strip().startswith("HTTP"))
        assert grpc_address.startswith("127.0.0.1:") and "curl" in banner and "grpcurl" in banner
        with grpc.insecure_channel(grpc_address) as channel:
            info = decode_pb2_grpc.DecodeStub(channel).ModelInfo(decode_pb2.ModelInfoRequest(), timeout=30)
        said = (tmp_path / "stderr.txt").read_text()
        if plan_flag:
            assert DeploymentPlan.from_toml(info.plan) == DISAGGREGATED_DEMO_PLAN
            assert "plan: attention 2 nodes x 2 devices, experts 4 nodes x 1 devices, m=2 --" in said and "asked for: plan = disaggregated" in said, said
        else:
            assert info.plan == ""  # one device, one program (decode.proto)
            assert "plan: colocated (one device, one program) -- CPU only" in said, said
        status, body = http("POST", http_address + "/v1/completions",
                            {"model": "tiny-moe", "prompt": "Beautiful is better than", "max_tokens": 3,
                             "temperature": 0}, timeout=300)
        assert status == 200 and body["choices"][0]["text"] == " ug"  # of " ugly." (a character-level vocabulary)
        assert body["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert any((tmp_path / "xla").iterdir())  # the programs it compiled, for the next start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()


def test_chat_template_from_tokenizer_config(tmp_path):
    """A checkpoint with a chat_template renders it (Jinja, sandboxed); tiny-moe has none and takes the
    documented fallback (the other tests cover that one end to end)."""
    from types import SimpleNamespace

    from serving.http_server import HttpApi, HttpError
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": %s, "eos_token": "</s>"}' % __import__("json").dumps(template))
    frontend = SimpleNamespace(config=SimpleNamespace(name="m", api_token=None))
    api = HttpApi(frontend, tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text",
                                                                                          "text": "Hi"}]}]
    assert api._chat_prompt(messages, True) == "<|system|>Be brief.</s><|user|>Hi</s><|assistant|>"
    assert HttpApi(frontend, None).chat.source is None
    assert HttpApi(frontend, None)._chat_prompt([{"role": "user", "content": "a"},
                                                 {"role": "assistant", "content": "b"}], True) == "a\nb\n"
    with pytest.raises(HttpError) as err:
        api._chat_prompt([{"role": "user", "content": [{"type": "image_url"}]}], True)
    assert err.value.param == "messages[0].content"
