"""vLLM's `vllm serve` flags (serve/vllm_compat_args.py): each implemented one changes what the server does, as
it does in vLLM, from the command line to the HTTP answer; each refused one is a one-line error (exit 2)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import ssl
import subprocess

import httpx
import pytest

from meshserve.cli import build_parser, main
from meshserve.engine.chat_template import render_chat
from meshserve.engine.chat_content_format import resolve_content_format, with_content_format
from meshserve.serve.cli import serve_config_from
from meshserve.serve.vllm_compat_args import _REFUSED, apply_vllm_compat
from tests.serve.conftest import MODEL, make_engine, serve_in_thread, start_server

TEMPLATE = ("{% if tools %}[tools]\n{% endif %}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}[{{ tag | default('bot') }}] {% endif %}")
KWARGS = {"tag": "helper"}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
PARTS_TEMPLATE = ("{% for m in messages %}{% for p in m['content'] %}<{{ p['type'] }}:{{ p['text'] }}>{% endfor %}"
                  "{% endfor %}")
USER = [{"role": "user", "content": "hi there"}]
ORIGIN = "https://app.example"


def _parse(*flags: str):
    ns = build_parser(["serve"]).parse_args(["serve", MODEL, *flags])
    apply_vllm_compat(ns)
    return ns


def _config(*flags: str):
    return serve_config_from(_parse(*flags), MODEL)


# -- a server started from vLLM flags ------------------------------------------------------------------
@pytest.fixture(scope="module")
def compat(tiny_engine, tmp_path_factory):
    template_file = tmp_path_factory.mktemp("template") / "chat.jinja"
    template_file.write_text(TEMPLATE)
    config = _config("--chat-template", str(template_file), "--response-role", "bot", "--max-logprobs", "3",
                     "--allowed-origins", json.dumps([ORIGIN]), "--root-path", "/api",
                     "--enable-force-include-usage", "--return-tokens-as-token-ids", "--enable-log-requests",
                     "--enable-log-outputs", "--max-log-len", "4", "--disable-fastapi-docs", "--api-key", "k",
                     "--default-chat-template-kwargs", json.dumps(KWARGS), "--exclude-tools-when-tool-choice-none")
    srv = start_server(tiny_engine, config)
    with httpx.Client(base_url=srv.base_url, timeout=60, headers={"Authorization": "Bearer k"}) as http:
        yield http, srv
    srv.stop()


def _chat(http, **body):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 3, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _events(http, path: str, **body) -> list[dict]:
    with http.stream("POST", path, json={"model": MODEL, "max_tokens": 3, "stream": True, **body}) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_chat_template_renders_every_chat_and_tokenize(compat, tiny_engine):
    http, _ = compat
    expected = render_chat(tiny_engine.tokenizer, USER, chat_template=TEMPLATE, template_kwargs=KWARGS)
    assert tiny_engine.tokenizer.decode(expected).strip() == "[user] hi there\n[helper]"
    assert http.post("/tokenize", json={"messages": USER}).json()["tokens"] == expected
    assert _chat(http)["usage"]["prompt_tokens"] == len(expected)
    own = http.post("/tokenize", json={"messages": USER, "chat_template_kwargs": {"tag": "me"}}).json()["tokens"]
    assert tiny_engine.tokenizer.decode(own).strip().endswith("[me]")  # the request's kwargs win


def test_a_request_s_own_template_needs_the_server_s_trust(compat, tiny_engine):
    http, _ = compat
    for body in ({"chat_template": "{{ 'x' }}"}, {"chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}):
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **body})
        assert r.status_code == 400 and "--trust-request-chat-template" in r.json()["error"]["message"]
        assert http.post("/tokenize", json={"messages": USER, **body}).status_code == 400
    srv = start_server(tiny_engine, _config("--trust-request-chat-template", "--chat-template", TEMPLATE))
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as trusted:
            own = "<{{ messages[0]['content'] }}>"
            r = trusted.post("/tokenize", json={"messages": USER, "chat_template": own})
            assert tiny_engine.tokenizer.decode(r.json()["tokens"]) == "<hi there>"
            # without --exclude-tools-when-tool-choice-none the template sees the tools of tool_choice "none"
            plain = _chat(trusted)["usage"]["prompt_tokens"]
            assert _chat(trusted, tools=TOOLS, tool_choice="none")["usage"]["prompt_tokens"] > plain
    finally:
        srv.stop()


def test_tools_left_out_of_the_template_when_tool_choice_is_none(compat):
    http, _ = compat
    plain = _chat(http)["usage"]["prompt_tokens"]
    assert _chat(http, tools=TOOLS, tool_choice="none")["usage"]["prompt_tokens"] == plain


def test_content_format_openai_gives_the_template_parts(tiny_engine):
    assert resolve_content_format("auto", PARTS_TEMPLATE) == "openai"
    assert resolve_content_format("auto", TEMPLATE) == "string"
    assert resolve_content_format("string", PARTS_TEMPLATE) == "string"
    messages = with_content_format(USER, "openai")
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]
    ids = render_chat(tiny_engine.tokenizer, messages, chat_template=PARTS_TEMPLATE, add_generation_prompt=False)
    assert tiny_engine.tokenizer.decode(ids) == "<text:hi there>"


def test_response_role_whole_and_streamed(compat, live):
    http, _ = compat
    assert _chat(http)["choices"][0]["message"]["role"] == "bot"
    # vLLM's rule: without a new turn, the role of the message the answer continues
    assert _chat(http, add_generation_prompt=False)["choices"][0]["message"]["role"] == "user"
    assert _events(http, "/v1/chat/completions", messages=USER)[0]["choices"][0]["delta"]["role"] == "bot"
    with httpx.Client(base_url=live.base_url, timeout=60) as plain:  # vLLM's default
        assert _chat(plain)["choices"][0]["message"]["role"] == "assistant"


def test_max_logprobs_is_a_400_above_it(compat):
    http, _ = compat
    assert len(_chat(http, logprobs=True, top_logprobs=3)["choices"][0]["logprobs"]["content"][0]
               ["top_logprobs"]) == 3
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "logprobs": True,
                                                "top_logprobs": 4})
    assert r.status_code == 400 and "--max-logprobs" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "logprobs": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_return_tokens_as_token_ids_is_the_server_default(compat):
    http, _ = compat
    token = _chat(http, logprobs=True)["choices"][0]["logprobs"]["content"][0]["token"]
    assert token.startswith("token_id:")
    own = _chat(http, logprobs=True, return_tokens_as_token_ids=False)["choices"][0]["logprobs"]["content"][0]
    assert not own["token"].startswith("token_id:")  # a request that says otherwise wins


def test_force_include_usage_ends_every_stream_with_usage(compat, live):
    http, _ = compat
    for path, body in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "a"})):
        last = _events(http, path, **body)[-1]
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    with httpx.Client(base_url=live.base_url, timeout=60) as plain:  # without the flag: none
        assert all(e.get("usage") is None for e in _events(plain, "/v1/completions", prompt="a"))


def test_cors_preflight_before_the_api_key_and_origins_checked(compat, live):
    http, _ = compat
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    r = httpx.options(http.base_url.join("/v1/chat/completions"), headers=preflight)  # no API key
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(http.base_url.join("/v1/chat/completions"),
                      headers={**preflight, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(http.base_url.join("/v1/models"), headers={"Origin": ORIGIN})  # a 401 the page can read
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(live.base_url + "/v1/models", headers={"Origin": "https://any.example"})
    assert r.headers["access-control-allow-origin"] == "*"  # vLLM's default: every origin


def test_root_path_and_docs(compat, live, tiny_engine):
    http, _ = compat
    assert http.get("/openapi.json").status_code == 404 and http.get("/docs").status_code == 404
    assert httpx.get(live.base_url + "/openapi.json").json().get("servers") is None
    assert http.get("/v1/models").status_code == 200
    # a proxy that keeps the prefix: routed, and still behind the API key
    assert http.get("/api/v1/models").status_code == 200
    assert httpx.get(http.base_url.join("/api/v1/models")).status_code == 401
    srv = start_server(tiny_engine, _config("--root-path", "/api"))
    try:
        assert httpx.get(srv.base_url + "/openapi.json").json()["servers"] == [{"url": "/api"}]
    finally:
        srv.stop()


def test_log_requests_and_outputs_cut_to_max_log_len(compat, caplog):
    http, _ = compat
    with caplog.at_level(logging.INFO, logger="meshserve.requests"):
        answer = _chat(http)
        streamed = _events(http, "/v1/completions", prompt="a b c d e f")
    request, output, stream_request, stream_output = [r.getMessage() for r in caplog.records
                                                      if r.name == "meshserve.requests"]
    assert request.startswith(f"Received request {answer['id']}-0: ") and "temperature" in request
    assert len(json.loads(request.split("prompt_token_ids: ")[1])) == 4
    assert output.startswith(f"Generated response {answer['id']}-0 (choice 0): output: ")
    assert len(json.loads(re.search(r"output_token_ids: (\[[^]]*\])", output).group(1))) == 3
    assert repr(answer["choices"][0]["message"]["content"][:4]) in output
    assert stream_request.startswith(f"Received request {streamed[0]['id']}-0: prompt: 'a b ', ")
    # each line carries both: the chat's text from its rendered ids, the text prompt's ids from its text (as vLLM
    # logs them; they were None)
    assert "prompt: None" not in request and "prompt_token_ids: None" not in stream_request
    assert len(json.loads(stream_request.split("prompt_token_ids: ")[1])) == 4
    assert "finish_reason: length" in stream_output  # a stream: logged once, whole, at its end


# -- engine flags ----------------------------------------------------------------------------------
def test_hf_overrides_reach_the_built_config(tiny_model_dir):
    from meshserve.cli_args import engine_args_from
    from meshserve.engine.engine_config import create_engine_config

    ns = build_parser(["serve"]).parse_args(["serve", "--model", tiny_model_dir("llama"), "--hf-overrides",
                                             '{"num_hidden_layers": 1, "rms_norm_eps": 0.001}'])
    config, _ = create_engine_config(engine_args_from(ns))
    assert config.model_config.hf_config.num_hidden_layers == 1
    assert config.model_config.hf_config.rms_norm_eps == 0.001


def test_override_generation_config_changes_the_defaults(greedy_model):
    """The model's generation_config.json says 5 new tokens, greedy; the override says 2 tokens."""
    from meshserve.cli_args import engine_args_from

    ns = _parse("--model", greedy_model, "--override-generation-config", '{"max_new_tokens": 2}')
    allm = make_engine(greedy_model, override_generation_config=engine_args_from(ns).override_generation_config)
    srv = start_server(allm, serve_config_from(ns, MODEL))
    try:
        assert allm.core_client.info.generation_defaults == {"temperature": 0.0, "max_tokens": 2}
        r = httpx.post(srv.v1 + "/completions", json={"model": MODEL, "prompt": "a", "ignore_eos": True},
                       timeout=60).json()
        assert r["usage"]["completion_tokens"] == 2
    finally:
        srv.stop()
        allm.shutdown()


def test_json_flags_survive_the_router_s_rebuilt_command_line():
    from meshserve.router.launcher import argv_from_namespace

    parser = build_parser(["serve"])
    argv = ["serve", "--hf-overrides", '{"num_hidden_layers": 2}', "--allowed-origins", '["https://a.b"]',
            "--override-generation-config", '{"temperature": 0.5}']
    ns = parser.parse_args(argv)
    serve_parser = ns.serve_parser
    again = parser.parse_args(["serve", *argv_from_namespace(serve_parser, ns)])
    assert again.hf_overrides == {"num_hidden_layers": 2} and again.allowed_origins == ["https://a.b"]
    assert again.override_generation_config == {"temperature": 0.5}


# -- aliases and no-ops ----------------------------------------------------------------------------
def test_aliases_fold_into_meshserve_s_flags(caplog):
    ns = _parse("--disable-uvicorn-access-log", "--disable-frontend-multiprocessing")
    assert ns.disable_access_log and ns.engine_in_thread
    with caplog.at_level(logging.INFO):
        ns = _parse("--trust-remote-code", "--tokenizer-mode", "hf", "--disable-log-requests",
                    "--enable-prompt-tokens-details", "--disable-log-stats")
    assert any("--trust-remote-code has no effect" in r.getMessage() for r in caplog.records)


def test_inline_chat_template_and_vllm_defaults():
    assert _config("--chat-template", TEMPLATE).chat_template == TEMPLATE
    config = _config()
    assert (config.chat_template, config.response_role, config.max_logprobs) == (None, "assistant", 20)
    assert config.allowed_origins == ["*"] and not config.allow_credentials


# -- refused ---------------------------------------------------------------------------------------
def _refused_argv(flag: str, kind: str) -> list[str]:
    return ["serve", MODEL, flag] + ({"switch": [], "value": ["x"], "values": ["a=b", "c=d"]}[kind])


@pytest.mark.parametrize("argv,message", [
    *[(_refused_argv(flag, kind), f"{flag}: ") for flag, (kind, _) in _REFUSED.items()],
    (["serve", "--tokenizer-mode", "mistral"], "--tokenizer-mode mistral is not supported"),
    (["serve", "--chat-template", "missing.jinja"], "--chat-template: no file 'missing.jinja'"),
    (["serve", "--override-generation-config", '{"do_sample": true}'], "unknown key 'do_sample'"),
    (["serve", "--max-logprobs", "21"], "--max-logprobs must be in [0, 20]"),
    (["serve", "--ssl-certfile", "/nonexistent.pem"], "needs both --ssl-keyfile and --ssl-certfile"),
    (["serve", "--root-path", "api"], "--root-path must start with '/'"),
])
def test_refused_flags_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshserve: error:") and message in err and len(err.strip().splitlines()) == 1


def test_a_bad_json_flag_is_argparse_s_error(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser(["serve"]).parse_args(["serve", "--hf-overrides", "[1]"])
    assert e.value.code == 2 and "expected a JSON object" in capsys.readouterr().err


# -- TLS -------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_serves_https_with_the_given_certificate(tiny_engine, tmp_path):
    from meshserve.serve.api_server import HttpOptions
    from meshserve.serve.openai_api import build_app
    from meshserve.serve.vllm_compat_args import compat_http_fields

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    ns = _parse("--ssl-keyfile", str(key), "--ssl-certfile", str(cert))
    opts = HttpOptions(**compat_http_fields(ns))
    assert opts.scheme == "https"
    base, server, thread = serve_in_thread(build_app(tiny_engine, serve_config_from(ns, MODEL)), **opts.uvicorn_ssl())
    try:
        https = base.replace("http://", "https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(https + "/health", verify=trusted).status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(base + "/health")
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
@pytest.mark.parametrize("case", ["swapped", "garbage", "ciphers"])
def test_an_unusable_certificate_is_a_one_line_error_before_loading(tmp_path, capsys, case):
    """A key and certificate uvicorn cannot load (swapped, not PEM, a cipher list OpenSSL rejects) stop serve
    with one line before the model loads (it was ssl.SSLError's traceback from uvicorn, after the load)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    flags = {"swapped": ["--ssl-keyfile", str(cert), "--ssl-certfile", str(key)],
             "garbage": ["--ssl-keyfile", str(key), "--ssl-certfile", str(tmp_path / "x.pem")],
             "ciphers": ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--ssl-ciphers", "NO-SUCH"]}[case]
    (tmp_path / "x.pem").write_text("not a certificate\n")
    assert main(["serve", "--device", "cpu", "--host", "127.0.0.1", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshserve: error: --ssl-") and len(err.strip().splitlines()) == 1, err


def test_refused_before_torch_is_imported():
    import sys

    probe = ("import json, sys; from meshserve.cli import main; rc = main(sys.argv[1:]); "
             "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")
    p = subprocess.run([sys.executable, "-c", probe, "serve", "--enable-lora", "--swap-space", "4"],
                       check=False, capture_output=True, text=True, timeout=60)
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"rc": 2, "torch": False}, p.stderr
    assert p.stderr.startswith("meshserve: error: --enable-lora:")


# -- --config FILE ---------------------------------------------------------------------------------
def test_config_file_sets_flags_the_command_line_does_not(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: /models/a\nport: 8123\nhost: 127.0.0.2\nenable_prefix_caching: false\n"
                    "served-model-name: [a, b]\nallowed-origins: ['https://a.b']\nresponse-role: bot\n"
                    "hf-overrides: {num_hidden_layers: 2}\nmax-model-len: 4K\ndisable-uvicorn-access-log: true\n")
    ns = _parse("--config", str(path), "--port", "9000")
    assert (ns.port, ns.host, ns.enable_prefix_caching) == (9000, "127.0.0.2", False)  # the command line wins
    assert ns.model_tag == MODEL and ns.model is None  # `serve MODEL` wins over the file's model
    assert ns.served_model_name == ["a", "b"] and ns.allowed_origins == ["https://a.b"]
    assert ns.hf_overrides == {"num_hidden_layers": 2} and ns.max_model_len == 4096
    assert ns.response_role == "bot" and ns.disable_access_log  # aliases fold after the file is read
    ns = build_parser(["serve"]).parse_args(["serve", "--config", str(path)])
    apply_vllm_compat(ns)
    assert ns.model_tag is None and ns.model == "/models/a"


def test_a_command_line_flag_wins_over_the_file_even_given_its_default(tmp_path, monkeypatch):
    """vLLM parses the file's flags first and the command line over them: `--port 8000` (the default) beats the
    file's `port: 9000`, `--enable-prefix-caching` its `false` (they used to lose: a flag counted as given only
    when its value differed from the default)."""
    import meshserve.serve.cli as serve_cli

    path = tmp_path / "serve.yaml"
    path.write_text("port: 9000\nenable-prefix-caching: false\ndtype: bfloat16\nmax-num-seqs: 4\n")
    seen = {}

    def fake_serve(ns):  # main() up to the point where the server would start
        apply_vllm_compat(ns)
        seen.update(vars(ns))
        return 0

    monkeypatch.setattr(serve_cli, "_cmd_serve", fake_serve)
    assert main(["--log-level", "INFO", "serve", "--config", str(path), "--port", "8000",
                 "--enable-prefix-caching", "--dtype", "auto"]) == 0
    assert (seen["port"], seen["enable_prefix_caching"], seen["dtype"]) == (8000, True, "auto")
    assert seen["max_num_seqs"] == 4  # what the command line leaves alone is the file's


@pytest.mark.parametrize("text,message", [
    ("enable-lora: true\n", "--enable-lora: LoRA"),  # what the file asks is refused like the command line
    ("no-such-flag: 1\n", "'no-such-flag', which is no `meshserve serve` flag"),
    ("- a\n- b\n", "must hold a mapping"),
    ("port: [\n", "is not valid YAML"),
])
def test_config_file_errors_are_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# -- --uds -----------------------------------------------------------------------------------------
def test_uds_serves_on_the_socket_and_refuses_a_live_one(tiny_engine, tmp_path):
    import socket
    import threading
    import time

    import uvicorn

    from meshserve.errors import InvalidArgumentError
    from meshserve.serve.openai_api import build_app
    from meshserve.serve.vllm_compat_args import bind_unix_socket

    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as stale:  # a socket file left by a server that is gone
        stale.bind(path)
    ns = _parse("--uds", path)
    sock = bind_unix_socket(ns.uds)
    server = uvicorn.Server(uvicorn.Config(build_app(tiny_engine, serve_config_from(ns, MODEL)), uds=path,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://meshserve") as http:
            assert http.get("/v1/models").json()["data"][0]["id"] == MODEL
        with pytest.raises(InvalidArgumentError, match="already listens"):
            bind_unix_socket(path)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgumentError, match="is not a socket"):
        bind_unix_socket(str(tmp_path / "file"))


def test_access_log_skips_the_given_endpoints():
    import uvicorn

    from meshserve.serve.access_log_filter import SkipPaths, skip_access_log
    from meshserve.serve.api_server import HttpOptions
    from meshserve.serve.vllm_compat_args import compat_http_fields

    opts = HttpOptions(**compat_http_fields(_parse("--disable-access-log-for-endpoints", "/health, /metrics")))
    assert opts.access_log_skip == ("/health", "/metrics")
    uvicorn.Config(app=None, log_level="info")  # configures uvicorn's loggers, as serving does first
    access = logging.getLogger("uvicorn.access")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.args[2])
    access.addHandler(handler)
    skip_access_log(opts.access_log_skip)
    try:
        for path in ("/health", "/metrics?x=1", "/v1/models", "/healthz"):
            access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", path, "1.1", 200)  # uvicorn's format
        assert seen == ["/v1/models", "/healthz"]
    finally:
        access.removeHandler(handler)
        for f in [f for f in access.filters if isinstance(f, SkipPaths)]:
            access.removeFilter(f)


def test_several_api_keys_and_vllm_s_environment_variable(tiny_engine, monkeypatch):
    srv = start_server(tiny_engine, _config("--api-key", "k1", "k2"))
    try:
        for key, status in (("k1", 200), ("k2", 200), ("k3", 401)):
            assert httpx.get(srv.v1 + "/models", headers={"Authorization": f"Bearer {key}"}).status_code == status
    finally:
        srv.stop()
    monkeypatch.delenv("MESHSERVE_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm-env")  # a vLLM deployment's key keeps guarding the server
    assert build_parser(["serve"]).parse_args(["serve"]).api_key == "from-vllm-env"


def test_async_scheduling_takes_vllm_s_flag_and_its_negation():
    # vLLM's --async-scheduling was refused as unrecognized (async scheduling is meshserve's default)
    def parsed(*flags: str) -> bool:
        return build_parser(["serve", *flags]).parse_args(["serve", *flags]).async_scheduling

    assert parsed() and parsed("--async-scheduling") and not parsed("--no-async-scheduling")
