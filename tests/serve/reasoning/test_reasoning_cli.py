"""`meshserve serve --reasoning-parser NAME`: the name reaches the server's config; an unknown one is a
one-line error naming the choices, before anything loads."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = ("import json, sys; from meshserve.cli import main; rc = main(sys.argv[1:]); "
         "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")


def test_the_flag_reaches_the_config():
    from meshserve.cli import build_parser
    from meshserve.serve.cli import serve_config_from

    for name in ("qwen3", "deepseek_r1", "mistral"):
        ns = build_parser(["serve"]).parse_args(["serve", "some/model", "--reasoning-parser", name])
        assert serve_config_from(ns, "some/model").reasoning_parser == name
    ns = build_parser(["serve"]).parse_args(["serve", "some/model"])
    assert serve_config_from(ns, "some/model").reasoning_parser is None


def test_an_unknown_parser_is_a_one_line_error():
    p = subprocess.run([sys.executable, "-c", PROBE, "serve", "--reasoning-parser", "r2"], capture_output=True,
                       text=True, timeout=60, check=False)
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"rc": 2, "torch": False}, p.stderr
    assert p.stderr.strip() == "meshserve: error: unknown --reasoning-parser 'r2'; choose from deepseek_r1, deepseek_v3, mistral, qwen3"
