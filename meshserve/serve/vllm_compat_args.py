"""`meshserve serve` flags named as vLLM's `vllm serve` names them, so a vLLM command line runs unchanged.

Three kinds, all in one argparse group ("vLLM compatibility"):
  implemented  the flag does here what it does in vLLM (chat template, CORS, TLS, root path, ...);
  no-op        what it asks for is already how meshserve works, or it only tunes something meshserve has no
               counterpart for and ignoring it changes no answer (NO_OP): taken, with a log line saying why;
  refused      meshserve cannot honour it: a one-line error that says what to use instead (REFUSED, and
               REFUSED_UNLESS for values other than meshserve's own behaviour), never a flag accepted and
               silently ignored.
The tables are vllm_flag_tables.py's.
`vllm_flag_treatment` decides for one flag and value; LLM(...) keywords of the same names go through it too
(entrypoints/llm.py), so the offline API takes each as the server takes the flag.
Every flag of vLLM 0.26's `vllm serve` parses (tests/serve/test_vllm_compat_args.py lists them), with its short
names (-n, -sc, -O3, ...) and, for vLLM's on/off flags, its --no-x form. Each flag keeps a dest of its own (but
ALIASES, other names of meshserve's own flags); `apply_vllm_compat` folds the aliases into meshserve's own flags,
so the router's replicas (rebuilt from the namespace, router/launcher.py) get the same command line back.
Nothing heavy is imported here: refusals come before torch loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import ssl
import stat
from typing import Any

from meshserve.errors import InvalidArgumentError
from meshserve.serve.vllm_flag_tables import (
    ALIASES,
    ASKS_FOR_NOTHING,
    NEGATABLE,
    NO_OP,
    REFUSED,
    REFUSED_UNLESS,
    SERVER_NO_OP,
    SHORT,
    SPEC_SHORTHANDS,
)
from meshserve.vllm_values import NO_OP_ARGS

logger = logging.getLogger(__name__)

# vLLM's own defaults: CORS open to every origin, at most 20 logprobs per position
DEFAULT_CORS = ("*",)
DEFAULT_MAX_LOGPROBS = 20
CONTENT_FORMATS = ("auto", "string", "openai")
TOKENIZER_MODES = ("auto", "hf", "slow", "mistral", "custom")
RUNNERS = ("auto", "generate", "pooling", "draft")
_JINJA_CHARS = "{}\n"  # vLLM's rule: a --chat-template with none of these is a path


class JsonDict(dict):
    """A dict parsed from a JSON flag; str() gives JSON back, so a rebuilt command line reparses it."""

    def __str__(self) -> str:
        return json.dumps(self)


class JsonList(list):
    def __str__(self) -> str:
        return json.dumps(self)


def _json_of(kind: type, what: str):
    def parse(text: str):
        try:
            value = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a JSON {what}, got {text!r}") from None
        if not isinstance(value, kind.__mro__[1]):
            raise argparse.ArgumentTypeError(f"expected a JSON {what}, got {text!r}")
        return kind(value)
    parse.__name__ = f"JSON {what}"
    return parse


json_dict = _json_of(JsonDict, "object")
json_list = _json_of(JsonList, "list")


def _name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def no_op_reason(flag: str) -> str:
    name = _name(flag)
    return NO_OP_ARGS.get(name) or SERVER_NO_OP[name]


class _Negation(argparse.Action):
    """--no-x for meshserve's store_true --x: sets x's dest False (the last of the two given wins, as in vLLM).
    It keeps no dest of its own, so the router's rebuilt command line and --config see only x."""

    def __init__(self, option_strings, dest, target: str, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.target = target

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.target, False)


def _dest(flag: str) -> str:
    return "vllm_" + flag.lstrip("-").replace("-", "_")


def add_vllm_compat_args(parser: argparse.ArgumentParser) -> None:
    """The `vllm serve` flags meshserve takes besides its own (which already use vLLM's names)."""
    g = parser.add_argument_group(
        "vLLM compatibility",
        "vLLM's names for what meshserve does the same way. Refused, with what to use instead: "
        + ", ".join([*REFUSED, *REFUSED_UNLESS]) + f". Taken with no effect (each logged, with why): "
        f"{len(NO_OP)} more that only tune what meshserve has no counterpart for (kernels, compilation, "
        "weight loading, scheduling, metrics and logging, multimodal and hybrid models).")
    g.add_argument("--config", dest="config_file", default=None, metavar="FILE",
                   help="YAML of `flag-name: value` lines (serve/config_file.py); command-line flags win")
    g.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                   help="Jinja chat template for every chat request and /tokenize, instead of the tokenizer's: "
                        "a file, or the template itself")
    g.add_argument("--chat-template-content-format", default="auto", choices=CONTENT_FORMATS,
                   help="message content as the template sees it: string, or openai (a list of "
                        '{"type": "text", "text": ...} parts); auto: openai if the template loops over content')
    g.add_argument("--default-chat-template-kwargs", type=json_dict, default=JsonDict(), metavar="JSON",
                   help='chat_template_kwargs every chat gets under its own, e.g. {"enable_thinking": false}')
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="let a request bring its own chat_template (else such a request gets a 400)")
    g.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help='tool_choice "none": the chat template is not given the tools')
    g.add_argument("--response-role", default="assistant", help="role of the chat answers")
    g.add_argument("--hf-overrides", type=json_dict, default=JsonDict(), metavar="JSON",
                   help='fields set on the model\'s HF config before it is built, e.g. {"num_hidden_layers": 4}')
    g.add_argument("--override-generation-config", type=json_dict, default=JsonDict(), metavar="JSON",
                   help="sampling defaults over --generation-config's, generation_config.json keys: temperature, "
                        "top_p, top_k, min_p, repetition_penalty, max_new_tokens")
    g.add_argument("--max-logprobs", type=int, default=DEFAULT_MAX_LOGPROBS,
                   help="most logprobs / top_logprobs / prompt_logprobs a request may ask for (400 above; at most "
                        "20 here)")
    g.add_argument("--allowed-origins", type=json_list, default=JsonList(DEFAULT_CORS), metavar="JSON",
                   help="CORS: origins allowed, a JSON list")
    g.add_argument("--allowed-methods", type=json_list, default=JsonList(DEFAULT_CORS), metavar="JSON",
                   help="CORS: methods allowed, a JSON list")
    g.add_argument("--allowed-headers", type=json_list, default=JsonList(DEFAULT_CORS), metavar="JSON",
                   help="CORS: request headers allowed, a JSON list")
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    g.add_argument("--root-path", default="",
                   help="path prefix a proxy serves the app under (FastAPI's root_path; OpenAPI's servers; "
                        "default: none)")
    g.add_argument("--uds", default=None, metavar="PATH",
                   help="listen on this unix domain socket instead of --host and --port")
    g.add_argument("--ssl-keyfile", default=None, help="TLS: the private key file (with --ssl-certfile)")
    g.add_argument("--ssl-certfile", default=None, help="TLS: the certificate file (serve HTTPS)")
    g.add_argument("--ssl-ca-certs", default=None, help="TLS: CA certificates to check client certificates")
    g.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE),
                   help="TLS: client certificates: 0 none, 1 optional, 2 required (Python's ssl.CERT_*)")
    g.add_argument("--ssl-ciphers", default=None, help="TLS: OpenSSL cipher list")
    g.add_argument("--disable-fastapi-docs", action="store_true",
                   help="no /docs, /redoc or /openapi.json")
    g.add_argument("--enable-log-requests", action="store_true",
                   help="log each generation request: its id, sampling parameters and prompt (see --max-log-len)")
    g.add_argument("--enable-log-outputs", action="store_true",
                   help="with --enable-log-requests: log each finished request's output too (text and token ids)")
    g.add_argument("--disable-log-requests", action="store_true", help="no-op: requests are not logged by default")
    g.add_argument("--max-log-len", type=int, default=None,
                   help="--enable-log-requests: most prompt characters and token ids logged (default: all)")
    g.add_argument("--enable-request-id-headers", action="store_true",
                   help="every response carries an X-Request-Id header: the request's own, else a random one "
                        "(a request's X-Request-Id names it, <prefix>-<id>, with or without this flag)")
    g.add_argument("--enable-force-include-usage", action="store_true",
                   help="every stream ends with a usage chunk, without stream_options.include_usage")
    g.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="no-op: usage.prompt_tokens_details.cached_tokens is always reported")
    g.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help='logprob tokens as "token_id:N" unless a request says otherwise')
    g.add_argument("--trust-remote-code", action="store_true",
                   help="no effect: meshserve never runs a model's own code (it implements the architectures)")
    g.add_argument("--runner", default="auto", choices=RUNNERS,
                   help="auto or generate: meshserve serves generative models; pooling and draft are refused")
    g.add_argument("--tokenizer-mode", default="auto", choices=TOKENIZER_MODES,
                   help="auto or hf: the tokenizer folder's fast tokenizer; slow, mistral and custom are refused")
    g.add_argument("--disable-uvicorn-access-log", dest=_dest("--disable-uvicorn-access-log"), action="store_true",
                   help="same as --disable-access-log")
    g.add_argument("--disable-access-log-for-endpoints", default=None, metavar="PATHS",
                   help='no access-log line for these comma-separated paths, e.g. "/health,/metrics"')
    g.add_argument("--disable-frontend-multiprocessing", dest=_dest("--disable-frontend-multiprocessing"),
                   action="store_true", help="same as --engine-in-thread")
    g.add_argument("--disable-log-stats", action="store_true",
                   help=f"no-op: {NO_OP_ARGS['disable_log_stats']}")
    for flag, kind in [*((f, k) for f, (k, _) in REFUSED.items()), *((f, "value") for f in REFUSED_UNLESS),
                       *NO_OP.items()]:
        _add_flag(g, flag, kind)
    for flag, key in SPEC_SHORTHANDS.items():
        g.add_argument(flag, dest=_dest(flag), type=int if flag == "--spec-tokens" else None, default=None,
                       help=f"--speculative-config's {key} (vLLM's shorthand)")
    for flag, alias in ALIASES.items():  # vLLM's other names of meshserve's own flags: the same action
        action = parser._option_string_actions[flag]
        parser._option_string_actions[alias] = action
        action.option_strings.append(alias)
    for flag in NEGATABLE:
        target = parser._option_string_actions[flag]
        g.add_argument("--no-" + flag[2:], action=_Negation, target=target.dest, help=argparse.SUPPRESS)


def _add_flag(g, flag: str, kind: str) -> None:
    """A vLLM flag refused or taken as a no-op: its own dest (None unless given), no --help line of its own."""
    names = [flag, *([SHORT[flag]] if flag in SHORT else [])]
    if kind == "switch":
        g.add_argument(*names, dest=_dest(flag), action="store_true", default=None, help=argparse.SUPPRESS)
    elif kind == "bool":
        g.add_argument(*names, dest=_dest(flag), action=argparse.BooleanOptionalAction, default=None,
                       help=argparse.SUPPRESS)
    else:
        nargs = {"value": None, "values": "+", "optional": "?"}[kind]
        g.add_argument(*names, dest=_dest(flag), nargs=nargs, const=True if kind == "optional" else None,
                       default=None, help=argparse.SUPPRESS)


def vllm_keyword_flag(name: str) -> str | None:
    """The flag that one of vLLM's LLM(...) keywords this module treats (refused, or a no-op) stands for; None for
    any other name. Server-only no-ops (SERVER_NO_OP) are no LLM(...) keywords: vLLM's LLM takes none of them."""
    flag = "--" + name.replace("_", "-")
    return flag if flag in REFUSED or flag in REFUSED_UNLESS or name in NO_OP_ARGS else None


def _as_flag_value(value: Any) -> Any:
    """An LLM(...) keyword's value as `meshserve serve` would have parsed the flag: text (a list of texts for
    several, JSON for a dict), True for a switch given, False for --no-x; None: not given."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [str(v) for v in value]
    return str(value)


def vllm_flag_treatment(flag: str, value: Any, data_parallel_size: int = 1, *, keyword: bool = False) -> str | None:
    """How meshserve takes one of vLLM's flags that it does not implement as vLLM does, given its value (None: not
    given): `meshserve serve` the parsed flag, LLM(...) the keyword of the same name (keyword=True: a Python value,
    read as the flag's text). A refusal raises InvalidArgumentError, one line with what to use instead; a no-op
    given returns why it has no effect (for the caller to log); a value that asks for nothing returns None."""
    name = _name(flag)
    if keyword:
        value = _as_flag_value(value)
        label, shown = f"LLM({name}=...)", f"LLM({name}={value!r})"
    else:
        label, shown = flag, f"{flag} {value}"
    if flag in REFUSED:
        if value not in (None, False, "", []) and value not in ASKS_FOR_NOTHING.get(flag, ()):
            raise InvalidArgumentError(f"{label}: {REFUSED[flag][1]}", param=name)
        return None
    if flag in REFUSED_UNLESS:
        accepted, why = REFUSED_UNLESS[flag]
        if flag == "--data-parallel-size-local":
            accepted = (str(data_parallel_size),)
        if value is not None and value not in accepted:
            raise InvalidArgumentError(f"{shown}: {why}", param=name)
        return None
    if flag == "--structured-outputs-config":
        _check_structured_outputs_config(value, label)
    return None if value is None else no_op_reason(flag)


def apply_vllm_compat(ns: argparse.Namespace) -> None:
    """Refuse what cannot be honoured (InvalidArgumentError, one line), fold the aliases into meshserve's own
    flags, resolve --chat-template to its text. Call before anything loads."""
    if ns.config_file:  # first: what the file sets is checked like the rest
        from meshserve.serve.config_file import merge_config_file

        merge_config_file(ns, ns.serve_parser, ns.config_file, getattr(ns, "argv", None))
    for flag in (*REFUSED, *REFUSED_UNLESS, *NO_OP):  # every refusal before any no-op is logged
        value = getattr(ns, _dest(flag))
        why = vllm_flag_treatment(flag, value, ns.data_parallel_size)
        if why is not None:  # a no-op given: --no-x is False
            logger.info("%s has no effect: %s", flag if value is not False else "--no-" + flag[2:], why)
    _fold_spec_shorthands(ns)
    if ns.tokenizer_mode not in ("auto", "hf"):
        raise InvalidArgumentError(f"--tokenizer-mode {ns.tokenizer_mode} is not supported: meshserve loads the "
                                   "tokenizer folder's fast tokenizer (auto)", param="tokenizer_mode")
    if ns.runner not in ("auto", "generate"):
        raise InvalidArgumentError(f"--runner {ns.runner} is not supported: meshserve serves generative models "
                                   "(embeddings and scores are not implemented)", param="runner")
    if not 0 <= ns.max_logprobs <= DEFAULT_MAX_LOGPROBS:
        raise InvalidArgumentError(f"--max-logprobs must be in [0, {DEFAULT_MAX_LOGPROBS}]: meshserve returns at "
                                   f"most {DEFAULT_MAX_LOGPROBS} logprobs per position", param="max_logprobs")
    if ns.enable_log_outputs and not ns.enable_log_requests:
        raise InvalidArgumentError("--enable-log-outputs needs --enable-log-requests", param="enable_log_outputs")
    if ns.max_log_len is not None and ns.max_log_len < 0:
        raise InvalidArgumentError("--max-log-len must be >= 0", param="max_log_len")
    if bool(ns.ssl_keyfile) != bool(ns.ssl_certfile):
        raise InvalidArgumentError("TLS needs both --ssl-keyfile and --ssl-certfile", param="ssl_certfile")
    for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        path = getattr(ns, name)
        if path and not os.path.isfile(path):
            raise InvalidArgumentError(f"--{name.replace('_', '-')}: no file {path!r}", param=name)
    if ns.ssl_cert_reqs not in (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED):
        raise InvalidArgumentError("--ssl-cert-reqs must be 0, 1 or 2", param="ssl_cert_reqs")
    if ns.ssl_certfile:
        check_tls_files(ns)
    if ns.ssl_certfile and ns.data_parallel_size > 1 and ns.data_parallel_backend == "router":
        raise InvalidArgumentError("TLS with --data-parallel-backend router is not supported (the replicas behind "
                                   "the router speak plain HTTP): use the internal back end", param="ssl_certfile")
    if ns.uds and ns.data_parallel_size > 1 and ns.data_parallel_backend == "router":
        raise InvalidArgumentError("--uds with --data-parallel-backend router is not supported (the router "
                                   "listens on --host and --port): use the internal back end", param="uds")
    if ns.root_path and not ns.root_path.startswith("/"):
        raise InvalidArgumentError("--root-path must start with '/'", param="root_path")
    if getattr(ns, _dest("--disable-uvicorn-access-log")):
        ns.disable_access_log = True
    if getattr(ns, _dest("--disable-frontend-multiprocessing")):
        ns.engine_in_thread = True
    for name in ("trust_remote_code", "disable_log_stats"):
        if getattr(ns, name):
            logger.info("--%s has no effect: %s", name.replace("_", "-"), NO_OP_ARGS[name])
    from meshserve.models.generation_defaults import generation_overrides

    overrides = generation_overrides(ns.override_generation_config)  # bad keys fail now, not after loading
    from meshserve.sampling import SamplingParams

    try:  # and bad values: temperature -1 served, then refused every request that left it unset with a 400
        SamplingParams(**overrides).validate()
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"--override-generation-config: {e}", param="override_generation_config") from None
    ns.chat_template_text = load_chat_template(ns.chat_template)


def _check_structured_outputs_config(text: str | None, label: str = "--structured-outputs-config") -> None:
    """--structured-outputs-config: {"backend": ...} passes as a no-op; keys that change answers are refused."""
    if text is None:
        return
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{label}: expected a JSON object, got {text!r}",
                                   param="structured_outputs_config")
    other = sorted(set(value) - {"backend"})
    if other:
        raise InvalidArgumentError(f"{label}: {', '.join(other)} not supported (only backend is taken, with no "
                                   "effect: meshserve's structured outputs have one grammar engine)",
                                   param="structured_outputs_config")


def _fold_spec_shorthands(ns: argparse.Namespace) -> None:
    """--spec-method / --spec-model / --spec-tokens into --speculative-config's JSON, as vLLM merges them (a key
    given both ways is an error). The shorthands are then cleared, so a rebuilt command line gives them once."""
    given = {key: getattr(ns, _dest(flag)) for flag, key in SPEC_SHORTHANDS.items()
             if getattr(ns, _dest(flag)) is not None}
    if not given:
        return
    config = ns.speculative_config or {}
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            config = None
    if not isinstance(config, dict):
        raise InvalidArgumentError("--speculative-config: expected a JSON object", param="speculative_config")
    for flag, key in SPEC_SHORTHANDS.items():
        if key in given and key in config:
            raise InvalidArgumentError(f"{flag} and --speculative-config's {key!r} are mutually exclusive",
                                       param=_name(flag))
        setattr(ns, _dest(flag), None)
    ns.speculative_config = json.dumps({**config, **given})


def check_tls_files(ns: argparse.Namespace) -> None:
    """Load the key, certificate, CA certificates and cipher list as uvicorn will: what OpenSSL rejects (a key
    and certificate swapped or mismatched, a file that is no PEM) is one line now, not ssl.SSLError's traceback
    once the model has loaded."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    steps = [("ssl_certfile", lambda: ctx.load_cert_chain(ns.ssl_certfile, ns.ssl_keyfile))]
    if ns.ssl_ca_certs:
        steps.append(("ssl_ca_certs", lambda: ctx.load_verify_locations(ns.ssl_ca_certs)))
    if ns.ssl_ciphers:
        steps.append(("ssl_ciphers", lambda: ctx.set_ciphers(ns.ssl_ciphers)))
    for name, step in steps:
        try:
            step()
        except OSError as e:  # ssl.SSLError too
            what = {"ssl_certfile": f"cannot load the key {ns.ssl_keyfile!r} and certificate {ns.ssl_certfile!r} "
                                    "as a matching PEM pair",
                    "ssl_ca_certs": f"cannot load the CA certificates {ns.ssl_ca_certs!r}",
                    "ssl_ciphers": f"OpenSSL takes none of the ciphers {ns.ssl_ciphers!r}"}[name]
            why = getattr(e, "reason", None) or e.strerror or (e.args[-1] if e.args else e)
            raise InvalidArgumentError(f"--{name.replace('_', '-')}: {what} ({why})", param=name) from None


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: the file's text, or the value itself when it looks like a template (vLLM's rule)."""
    if value is None:
        return None
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                return _check_jinja_syntax(f.read(), f" {value!r}")
        except OSError as e:
            raise InvalidArgumentError(f"--chat-template: cannot read {value!r}: {e.strerror}",
                                       param="chat_template") from None
        except UnicodeDecodeError as e:  # a binary file: it was a traceback
            raise InvalidArgumentError(f"--chat-template: {value!r} is not UTF-8 text ({e.reason})",
                                       param="chat_template") from None
    if any(c in value for c in _JINJA_CHARS):
        return _check_jinja_syntax(value, "")
    raise InvalidArgumentError(f"--chat-template: no file {value!r} (and it is no Jinja template either)",
                               param="chat_template")


def _check_jinja_syntax(text: str, source: str) -> str:
    """text, once it parses as Jinja with the tags chat templates use (transformers' environment: loop controls
    and {% generation %}): a syntax error served, then answered every chat request with a 400."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols

    class _Generation(Extension):  # transformers' {% generation %}...{% endgeneration %}: its body, for parsing
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    try:
        jinja2.Environment(extensions=[loopcontrols, _Generation]).parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidArgumentError(f"--chat-template{source}: not a valid Jinja template (line {e.lineno}: "
                                   f"{e.message})", param="chat_template") from None
    return text


def compat_serve_fields(ns: argparse.Namespace) -> dict[str, Any]:
    """ServeConfig's fields that come from these flags."""
    return {"chat_template": getattr(ns, "chat_template_text", None) or load_chat_template(ns.chat_template),
            "chat_template_content_format": ns.chat_template_content_format, "response_role": ns.response_role,
            "max_logprobs": ns.max_logprobs, "allowed_origins": list(ns.allowed_origins),
            "allowed_methods": list(ns.allowed_methods), "allowed_headers": list(ns.allowed_headers),
            "allow_credentials": ns.allow_credentials, "root_path": ns.root_path,
            "disable_fastapi_docs": ns.disable_fastapi_docs, "enable_log_requests": ns.enable_log_requests,
            "max_log_len": ns.max_log_len, "enable_log_outputs": ns.enable_log_outputs,
            "enable_force_include_usage": ns.enable_force_include_usage,
            "return_tokens_as_token_ids": ns.return_tokens_as_token_ids,
            "default_chat_template_kwargs": dict(ns.default_chat_template_kwargs),
            "trust_request_chat_template": ns.trust_request_chat_template,
            "exclude_tools_when_tool_choice_none": ns.exclude_tools_when_tool_choice_none,
            "enable_request_id_headers": ns.enable_request_id_headers}


def compat_http_fields(ns: argparse.Namespace) -> dict[str, Any]:
    """HttpOptions' fields that come from these flags (uvicorn's TLS settings)."""
    return {"ssl_keyfile": ns.ssl_keyfile, "ssl_certfile": ns.ssl_certfile, "ssl_ca_certs": ns.ssl_ca_certs,
            "ssl_cert_reqs": ns.ssl_cert_reqs, "ssl_ciphers": ns.ssl_ciphers, "uds": ns.uds,
            "access_log_skip": tuple(p.strip() for p in (ns.disable_access_log_for_endpoints or "").split(",")
                                     if p.strip())}


def bind_unix_socket(path: str) -> socket.socket:
    """--uds: the listening unix socket, bound now (uvicorn serves on it later). A stale socket file (no server
    answering on it) is replaced, as uvicorn does; a file that is no socket, or a live server's, is an error."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise InvalidArgumentError(f"--uds: {path!r} exists and is not a socket", param="uds")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: left by a server that is gone
            else:
                raise InvalidArgumentError(f"--uds: a server already listens on {path!r}", param="uds")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise InvalidArgumentError(f"--uds: cannot listen on {path!r}: {e.strerror or e}", param="uds") from None
    return sock
