"""vLLM's `vllm serve` flags (serve/vllm_compat_args.py): each implemented one changes what the server does, as
it does in vLLM, from the command line to the HTTP answer; each refused one is a one-line error (exit 2)."""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import ssl
import subprocess

import httpx
import pytest

from meshserve.cli import build_parser, main
from meshserve.engine.chat_content_format import resolve_content_format, with_content_format
from meshserve.engine.chat_template import render_chat
from meshserve.errors import InvalidArgumentError
from meshserve.router.launcher import argv_from_namespace
from meshserve.serve.cli import serve_config_from
from meshserve.serve.vllm_compat_args import apply_vllm_compat, no_op_reason
from meshserve.serve.vllm_flag_tables import NO_OP, REFUSED, REFUSED_UNLESS
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
    values = {"switch": [], "bool": [], "optional": [], "value": ["x"], "values": ["a=b", "c=d"]}[kind]
    return ["serve", MODEL, flag, *values]


@pytest.mark.parametrize("argv,message", [
    *[(_refused_argv(flag, kind), f"{flag}: ") for flag, (kind, _) in REFUSED.items()],
    *[(["serve", MODEL, flag, "x"], f"{flag} x: ") for flag in REFUSED_UNLESS],
    (["serve", "--hf-token", "hf_abc"], "--hf-token: meshserve downloads nothing"),
    (["serve", "-dcp", "2"], "--decode-context-parallel-size 2: context parallelism is not supported"),
    (["serve", "-dpl", "2"], "--data-parallel-size-local 2: not supported"),
    (["serve", "-cc", '{"mode": 3}'], "--compilation-config: not supported"),
    (["serve", "--logprobs-mode", "processed_logprobs"], "logprobs are those of the raw logits"),
    (["serve", "--structured-outputs-config", '{"disable_any_whitespace": true}'], "disable_any_whitespace not "
                                                                                    "supported"),
    (["serve", "--speculative-config", '{"method": "ngram"}', "--spec-method", "ngram"],
     "--spec-method and --speculative-config's 'method' are mutually exclusive"),
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


# -- every flag of vLLM 0.26's `vllm serve` --------------------------------------------------------
# Each option string its parser takes (short names and --no-x forms too), with a value where it takes one, from
# vllm/entrypoints/openai/cli_args.py and vllm/engine/arg_utils.py (listed here: CI has no vLLM).
VLLM_SERVE_FLAGS = """
--headless  --api-server-count 1  -asc 1  --config serve.yaml  --grpc  --lora-modules a=/b
--chat-template '{{ messages }}'  --chat-template-content-format auto  --trust-request-chat-template
--no-trust-request-chat-template  --default-chat-template-kwargs '{}'  --response-role assistant
--return-tokens-as-token-ids  --no-return-tokens-as-token-ids  --enable-auto-tool-choice
--no-enable-auto-tool-choice  --exclude-tools-when-tool-choice-none  --no-exclude-tools-when-tool-choice-none
--tool-call-parser hermes  --tool-parser-plugin p.py  --tool-server demo  --log-config-file log.json
--max-log-len 100  --enable-prompt-tokens-details  --no-enable-prompt-tokens-details  --enable-per-request-metrics
--no-enable-per-request-metrics  --enable-server-load-tracking  --no-enable-server-load-tracking
--enable-force-include-usage  --no-enable-force-include-usage  --enable-tokenizer-info-endpoint
--no-enable-tokenizer-info-endpoint  --enable-log-outputs  --no-enable-log-outputs  --enable-log-deltas
--no-enable-log-deltas  --log-error-stack  --no-log-error-stack  --tokens-only  --no-tokens-only
--fingerprint-mode full  --fingerprint-value v  --host 127.0.0.1  --port 8000  --data-parallel-supervisor-port 9256
--dp-supervisor-probe-interval-s 5.0  --dp-supervisor-probe-timeout-s 5.0  --dp-supervisor-probe-failure-threshold 3
--uds /tmp/meshserve-x.sock  --uvicorn-log-level info  --disable-uvicorn-access-log  --no-disable-uvicorn-access-log
--disable-access-log-for-endpoints /health  --allow-credentials  --no-allow-credentials  --allowed-origins '["*"]'
--allowed-methods '["*"]'  --allowed-headers '["*"]'  --api-key k  --ssl-keyfile key.pem  --ssl-certfile cert.pem
--ssl-ca-certs ca.pem  --enable-ssl-refresh  --no-enable-ssl-refresh  --ssl-cert-reqs 0  --ssl-ciphers ECDHE
--root-path /api  --middleware a.B  --enable-request-id-headers  --no-enable-request-id-headers
--disable-fastapi-docs  --no-disable-fastapi-docs  --h11-max-incomplete-event-size 4194304
--h11-max-header-count 256  --enable-offline-docs  --no-enable-offline-docs  --enable-flash-late-interaction
--no-enable-flash-late-interaction  --model m  --runner auto  --convert auto  --tokenizer tok  --tokenizer-mode auto
--trust-remote-code  --no-trust-remote-code  --dtype auto  --seed 0  --hf-config-path cfg
--allowed-local-media-path /media  --allowed-media-domains example.com  --revision main  --code-revision main
--tokenizer-revision main  --max-model-len 32k  --quantization fp8  -q fp8
--quantization-config '{"linear": "fp8"}'  --allow-deprecated-quantization  --no-allow-deprecated-quantization
--enforce-eager  --no-enforce-eager  --enable-return-routed-experts  --no-enable-return-routed-experts
--max-logprobs 20  --logprobs-mode raw_logprobs  --use-fp64-gumbel  --no-use-fp64-gumbel  --disable-sliding-window
--no-disable-sliding-window  --disable-cascade-attn  --no-disable-cascade-attn  --skip-tokenizer-init
--no-skip-tokenizer-init  --enable-prompt-embeds  --no-enable-prompt-embeds  --served-model-name m
--config-format auto  --hf-token  --hf-overrides '{}'  --model-class-overrides '{}'  --pooler-config '{}'
--generation-config auto  --override-generation-config '{}'  --enable-sleep-mode  --no-enable-sleep-mode
--enable-cumem-allocator  --no-enable-cumem-allocator  --model-impl auto  --override-attention-dtype float32
--logits-processors a.B  --io-processor-plugin p  --renderer-num-workers 1  --load-format auto  --download-dir /d
--safetensors-load-strategy lazy  --safetensors-prefetch-num-threads 8  --safetensors-prefetch-block-size 16777216
--model-loader-extra-config '{}'  --ignore-patterns 'original/**/*'  --use-tqdm-on-load  --no-use-tqdm-on-load
--pt-load-map-location cpu  --attention-backend FLASH_ATTN  --mamba-backend triton
--enable-mamba-cache-stochastic-rounding  --no-enable-mamba-cache-stochastic-rounding  --mamba-cache-philox-rounds 0
--reasoning-parser qwen3  --reasoning-parser-plugin p.py  --distributed-executor-backend mp
--pipeline-parallel-size 1  -pp 1  --master-addr 127.0.0.1  --master-port 29501  --nnodes 1  -n 1  --node-rank 0
-r 0  --distributed-timeout-seconds 600  --cpu-distributed-timeout-seconds 600  --numa-bind  --no-numa-bind
--numa-bind-nodes 0  --numa-bind-cpus 0-7  --device-ids 0,1  --tensor-parallel-size 1  -tp 1
--decode-context-parallel-size 1  -dcp 1  --dcp-comm-backend ag_rs  --dcp-kv-cache-interleave-size 1
--cp-kv-cache-interleave-size 1  --prefill-context-parallel-size 1  -pcp 1  --data-parallel-size 1  -dp 1
--data-parallel-rank 0  -dpn 0  --data-parallel-start-rank 0  -dpr 0  --data-parallel-size-local 1  -dpl 1
--data-parallel-address 10.0.0.1  -dpa 10.0.0.1  --data-parallel-rpc-port 13345  -dpp 13345
--data-parallel-backend mp  -dpb mp  --data-parallel-hybrid-lb  --no-data-parallel-hybrid-lb  -dph
--data-parallel-external-lb  --no-data-parallel-external-lb  -dpe  --data-parallel-multi-port-external-lb  -dpm
--enable-expert-parallel  --no-enable-expert-parallel  -ep  --enable-ep-weight-filter  --no-enable-ep-weight-filter
--all2all-backend allgather_reducescatter  --enable-dbo  --no-enable-dbo  --ubatch-size 0  --enable-elastic-ep
--no-enable-elastic-ep  --dbo-decode-token-threshold 32  --dbo-prefill-token-threshold 512
--disable-nccl-for-dp-synchronization  --no-disable-nccl-for-dp-synchronization  --enable-eplb  --no-enable-eplb
--eplb-config '{}'  --expert-placement-strategy linear  --max-parallel-loading-workers 2  --ray-workers-use-nsight
--no-ray-workers-use-nsight  --disable-custom-all-reduce  --no-disable-custom-all-reduce  --worker-cls auto
--worker-extension-cls a.B  --block-size 16  --gpu-memory-utilization 0.92  --kv-cache-memory-bytes 8G
--kv-cache-dtype auto  --num-gpu-blocks-override 100  --enable-prefix-caching  --no-enable-prefix-caching
--prefix-caching-hash-algo sha256  --calculate-kv-scales  --no-calculate-kv-scales  --kv-cache-dtype-skip-layers 0
--kv-sharing-fast-prefill  --no-kv-sharing-fast-prefill  --mamba-cache-dtype auto  --mamba-ssm-cache-dtype auto
--mamba-block-size 16  --prefix-match-unit 16  --mamba-cache-mode none  --kv-offloading-size 4
--kv-offloading-backend native  --offload-backend auto  --cpu-offload-gb 0  --cpu-offload-params w
--offload-group-size 0  --offload-num-in-group 1  --offload-prefetch-step 1  --offload-params w
--language-model-only  --no-language-model-only  --limit-mm-per-prompt '{"image": 0}'  --enable-mm-embeds
--no-enable-mm-embeds  --media-io-kwargs '{}'  --mm-processor-kwargs '{}'  --mm-processor-cache-gb 4
--mm-processor-cache-type lru  --mm-shm-cache-max-object-size-mb 128  --mm-encoder-only  --no-mm-encoder-only
--mm-encoder-tp-mode weights  --mm-encoder-attn-backend FLASH_ATTN  --mm-encoder-attn-dtype fp8
--mm-encoder-fp8-scale-path s.json  --mm-encoder-fp8-scale-save-path s.json  --mm-encoder-fp8-scale-save-margin 1.5
--interleave-mm-strings  --no-interleave-mm-strings  --skip-mm-profiling  --no-skip-mm-profiling
--video-pruning-rate 0.5  --mm-tensor-ipc direct_rpc  --mm-ipc-gpu-memory-gb 0  --enable-lora  --no-enable-lora
--max-loras 1  --max-lora-rank 16  --lora-dtype auto  --enable-tower-connector-lora
--no-enable-tower-connector-lora  --max-cpu-loras 2  --fully-sharded-loras  --no-fully-sharded-loras
--lora-target-modules q_proj  --default-mm-loras '{}'  --specialize-active-lora  --no-specialize-active-lora
--enable-mixed-moe-lora-format  --no-enable-mixed-moe-lora-format  --enable-moe-shared-loras
--no-enable-moe-shared-loras  --show-hidden-metrics-for-version 0.25  --otlp-traces-endpoint http://otel:4317
--collect-detailed-traces all  --kv-cache-metrics  --no-kv-cache-metrics  --kv-cache-metrics-sample 0.01
--cudagraph-metrics  --no-cudagraph-metrics  --enable-layerwise-nvtx-tracing  --no-enable-layerwise-nvtx-tracing
--enable-mfu-metrics  --no-enable-mfu-metrics  --enable-logging-iteration-details
--no-enable-logging-iteration-details  --jit-monitor-mode warn  --jit-monitor-verbose  --no-jit-monitor-verbose
--max-num-batched-tokens 8192  --max-num-scheduled-tokens 8192  --max-num-seqs 256  --max-num-partial-prefills 1
--max-long-partial-prefills 1  --long-prefill-token-threshold 0  --scheduling-policy fcfs  --enable-chunked-prefill
--no-enable-chunked-prefill  --disable-chunked-mm-input  --no-disable-chunked-mm-input  --scheduler-cls a.B
--scheduler-reserve-full-isl  --no-scheduler-reserve-full-isl  --watermark 0.0  --prefill-schedule-interval 1
--disable-hybrid-kv-cache-manager  --no-disable-hybrid-kv-cache-manager  --async-scheduling  --no-async-scheduling
--stream-interval 1  --cudagraph-capture-sizes 1 2 4  --max-cudagraph-capture-size 512  --ir-op-priority '{}'
--enable-flashinfer-autotune  --no-enable-flashinfer-autotune  --enable-bf16x3-router-gemm
--no-enable-bf16x3-router-gemm  --moe-backend auto  --linear-backend auto
--speculative-config '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'
-sc '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'  --spec-method ngram  --spec-model m
--spec-tokens 4  --diffusion-config '{}'  -dc '{}'
--kv-transfer-config '{"kv_connector": "torch", "kv_role": "kv_both"}'  --kv-events-config '{}'
--ec-transfer-config '{}'  --compilation-config '{"mode": 3}'  -cc '{"mode": 3}'  --attention-config '{}'  -ac '{}'
--reasoning-config '{}'  --kernel-config '{}'  --additional-config '{}'
--structured-outputs-config '{"backend": "xgrammar"}'  --profiler-config '{}'  --optimization-level 3
--performance-mode balanced  --weight-transfer-config '{}'  --disable-log-stats  --aggregate-engine-logging
--fail-on-environ-validation  --no-fail-on-environ-validation  --shutdown-timeout 0  --gdn-prefill-backend triton
--enable-log-requests  --no-enable-log-requests  --hf-token hf_x
"""


def _vllm_flags() -> list[list[str]]:
    entries: list[list[str]] = []
    for token in shlex.split(VLLM_SERVE_FLAGS):
        if token.startswith("-"):
            entries.append([token])
        else:
            entries[-1].append(token)
    return entries


@pytest.mark.parametrize("argv", _vllm_flags(), ids=lambda argv: argv[0])
def test_every_vllm_serve_flag_is_known(argv, capsys):
    # parsed (never argparse's "unrecognized arguments"), then taken or refused in one line before loading
    try:
        ns = build_parser(["serve"]).parse_args(["serve", *argv])
    except SystemExit:
        pytest.fail(capsys.readouterr().err)
    try:
        apply_vllm_compat(ns)
    except InvalidArgumentError as e:
        assert "\n" not in str(e)


def test_each_vllm_flag_has_one_treatment_and_a_reason():
    refused, no_op = set(REFUSED) | set(REFUSED_UNLESS), set(NO_OP)
    assert not refused & no_op
    assert all(no_op_reason(flag) for flag in NO_OP)
    listed = {argv[0] for argv in _vllm_flags()}
    assert refused - {"--swap-space"} <= listed and no_op <= listed  # --swap-space: vLLM before 0.11's


def test_no_ops_are_logged_with_why(caplog):
    with caplog.at_level(logging.INFO, logger="meshserve"):
        ns = _parse("--attention-backend", "FLASH_ATTN", "-O3", "--no-use-tqdm-on-load", "--disable-log-stats",
                    "--structured-outputs-config", '{"backend": "xgrammar"}', "--stream-interval", "10")
    logged = [r.getMessage() for r in caplog.records]
    for flag in ("--attention-backend", "--optimization-level", "--no-use-tqdm-on-load", "--disable-log-stats",
                 "--structured-outputs-config", "--stream-interval"):
        assert any(m.startswith(f"{flag} has no effect: ") for m in logged), flag
    assert ns.vllm_optimization_level == "3"


def test_vllm_defaults_spelled_out_ask_for_nothing():
    # a refused feature's off switch or default value passes, as a vLLM script often writes them
    _parse("--no-enable-lora", "--cpu-offload-gb", "0", "--max-loras", "1", "--lora-dtype", "auto",
           "--logprobs-mode", "raw_logprobs", "-dcp", "1", "-pcp", "1", "--model-impl", "vllm", "--convert", "none",
           "--no-enable-sleep-mode", "--no-data-parallel-external-lb", "--worker-cls", "auto")
    _parse("-dp", "2", "--data-parallel-size-local", "2")


def test_vllm_s_other_names_of_meshserve_s_flags():
    ns = _parse("-n", "2", "-r", "1", "--distributed-timeout-seconds", "90", "-dpb", "mp", "--shutdown-timeout",
                "0", "-sc", '{"method": "ngram", "num_speculative_tokens": 2}', "--max-model-len=2k", "-tp=1")
    assert (ns.nnodes, ns.node_rank, ns.distributed_timeout_s, ns.drain_timeout) == (2, 1, 90.0, 0.0)
    assert ns.data_parallel_backend == "internal" and ns.max_model_len == 2000
    assert json.loads(ns.speculative_config) == {"method": "ngram", "num_speculative_tokens": 2}
    ns = _parse("--spec-method", "ngram", "--spec-tokens", "3", "--speculative-config", '{"prompt_lookup_max": 4}')
    assert json.loads(ns.speculative_config) == {"prompt_lookup_max": 4, "method": "ngram",
                                                 "num_speculative_tokens": 3}


def test_no_x_forms_the_last_given_wins():
    assert not _parse("--enforce-eager", "--no-enforce-eager").enforce_eager
    assert _parse("--no-enforce-eager", "--enforce-eager").enforce_eager
    ns = _parse("--enable-auto-tool-choice", "--no-enable-auto-tool-choice", "--no-trust-remote-code",
                "--no-enable-prefix-caching", "-ep", "--no-enable-expert-parallel", "--no-enable-log-requests")
    assert not (ns.enable_auto_tool_choice or ns.trust_remote_code or ns.enable_prefix_caching
                or ns.enable_expert_parallel or ns.enable_log_requests)


def test_rebuilt_command_line_gives_the_same_flags():
    # the router's replicas get their command line from the namespace (after the aliases were folded)
    parser = build_parser(["serve"])
    serve_parser = parser.parse_args(["serve"]).serve_parser
    argv = ["serve", "--enforce-eager", "-n", "2", "--spec-method", "ngram", "--spec-tokens", "3",
            "--no-trust-remote-code", "--attention-backend", "X", "--no-enable-lora", "--shutdown-timeout", "5", "-O3"]
    ns = parser.parse_args(argv)
    apply_vllm_compat(ns)
    again = parser.parse_args(["serve", *argv_from_namespace(serve_parser, ns)])
    apply_vllm_compat(again)
    for name in ("enforce_eager", "nnodes", "speculative_config", "drain_timeout", "trust_remote_code",
                 "vllm_attention_backend", "vllm_optimization_level"):
        assert getattr(again, name) == getattr(ns, name), name
